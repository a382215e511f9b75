"""Fine-tuning: examples from the time split, block-aware masks and forward, the training loop,
checkpoints and the saved model (tiny random-weight models, small synthetic data)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rcllm.data.synthetic import make_synthetic
from rcllm.engine import BlockEngine, MemoryBlockCache, PromptBuilder, Ranker
from rcllm.engine.models import load_model
from rcllm.train import TrainingInterrupted, TrainSettings, block_attention_mask, block_positions, train
from rcllm.train.checkpoint import checkpoint_dir
from rcllm.train.examples import ExampleStream, PromptEncoder
from rcllm.train.forward import answer_logits, collate, label_loss

HISTORY = [f"Movie {i} ({1980 + i}); Drama" for i in range(4)]
CANDIDATES = [f"Film number {i}; Comedy, Action" for i in range(5)]


def _settings(tmp_path: Path, model: Path, **overrides) -> TrainSettings:
    base = dict(
        out=tmp_path / "model", model=str(model), method="full", steps=4, batch=2, lr=1e-3, history=3,
        candidates=4, block_aware="mix", eval_every=2, val_users=3, seed=0, amp="off",  # same numerics on every CPU
    )
    return TrainSettings(**{**base, **overrides})


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


# --- masks and positions: pure functions of a layout ----------------------------------------


def test_block_mask_lets_blocks_see_only_the_system_prefix_and_themselves():
    layout = [("system", 2), ("history", 2), ("label", 1), ("item", 2), ("instruction", 2)]
    mask = block_attention_mask(layout)
    assert mask.shape == (9, 9) and mask.dtype == torch.bool
    s, h, lab, i, ins = [0, 1], [2, 3], [4], [5, 6], [7, 8]
    expected = torch.zeros(9, 9, dtype=torch.bool)
    for rows, cols in [(s, s), (h, s + h), (lab, s + h + lab), (i, s + i), (ins, s + h + lab + i + ins)]:
        for r in rows:
            for c in cols:
                expected[r, c] = c <= r
    assert torch.equal(mask, expected)


def test_block_positions_put_every_block_right_after_the_system_prefix():
    layout = [("system", 3), ("history", 2), ("label", 1), ("item", 2), ("label", 1), ("item", 1), ("instruction", 1)]
    assert block_positions(layout).tolist() == [0, 1, 2, 3, 4, 5, 3, 4, 8, 3, 10]


def test_layout_must_start_with_the_system_segment():
    with pytest.raises(ValueError, match="system"):
        block_attention_mask([("history", 2), ("system", 1)])


# --- the training forward against the serving engine ----------------------------------------


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def ranker(request, tiny_models):
    lm = load_model(tiny_models[request.param])
    return Ranker(BlockEngine(lm), PromptBuilder(lm.tokenizer))


def _prompts(ranker):
    from rcllm.train.examples import EncodedPrompt

    out = []
    for history, candidates in [(HISTORY, CANDIDATES), (HISTORY[:1], CANDIDATES[::-1])]:
        segments, _ = ranker.segments(history, candidates)
        ids = torch.cat([s.token_ids for s in segments])
        out.append(EncodedPrompt(ids, [(s.name, s.n_tokens) for s in segments], 0, len(candidates)))
    return out, [(HISTORY, CANDIDATES), (HISTORY[:1], CANDIDATES[::-1])]


def test_plain_training_forward_matches_full_prefill_in_a_padded_batch(ranker):
    prompts, cases = _prompts(ranker)
    lm = ranker.engine.lm
    with torch.no_grad():
        logits = answer_logits(lm.model, collate(prompts, block_aware=False), lm.inv_freq, lm.head_dim)
    for row, (history, candidates) in enumerate(cases):
        segments, _ = ranker.segments(history, candidates)
        expected = ranker.engine.forward(segments, "full").logits
        assert (logits[row] - expected).abs().max() < 1e-4


def test_block_aware_training_forward_matches_reuse_with_policy_none(ranker):
    prompts, cases = _prompts(ranker)
    lm = ranker.engine.lm
    batch = collate(prompts, block_aware=True)
    assert batch.mask.shape == (2, 1, batch.ids.shape[1], 2 * batch.ids.shape[1])
    with torch.no_grad():
        logits = answer_logits(lm.model, batch, lm.inv_freq, lm.head_dim)
    cache = MemoryBlockCache(ranker.engine, ranker.builder)
    for row, (history, candidates) in enumerate(cases):
        segments, _ = ranker.segments(history, candidates, cache)
        expected = ranker.engine.forward(segments, "none").logits
        full = ranker.engine.forward(ranker.segments(history, candidates)[0], "full").logits
        assert (logits[row] - expected).abs().max() < 1e-4
        assert (logits[row] - full).abs().max() > 1e-3  # reuse really differs from a plain prefill here


def test_block_aware_loss_has_gradients_for_block_tokens(ranker):
    prompts, _ = _prompts(ranker)
    lm = ranker.engine.lm
    embed = lm.model.model.embed_tokens.weight
    embed.requires_grad_(True)
    try:
        batch = collate(prompts, block_aware=True)
        logits = answer_logits(lm.model, batch, lm.inv_freq, lm.head_dim)
        loss = label_loss(logits, batch, ranker.builder.label_token_ids)
        loss.backward()
        item_token = int(prompts[0].ids[sum(n for _, n in prompts[0].layout[:3])])  # first token of item 1
        assert torch.isfinite(loss) and embed.grad[item_token].abs().sum() > 0
    finally:
        embed.grad = None
        embed.requires_grad_(False)


# --- examples ---------------------------------------------------------------------------------


@pytest.mark.parametrize("recent", [0, 2])
def test_training_examples_never_show_a_validation_or_test_target(small_data, recent):
    stream = ExampleStream(small_data, history=3, candidates=4, seed=0, val_users=5, recent=recent)
    split = stream.split
    seen_users = set()
    for step in range(200):
        for ex in stream.batch(step, 4):
            seen_users.add(ex.user)
            held_out = {split.validation[ex.user], split.test[ex.user]}
            assert not held_out & (set(ex.history) | set(ex.candidates))
            assert ex.target in split.train[ex.user]
            t = split.train[ex.user].index(ex.target)
            assert t >= 1 and list(ex.history) == split.train[ex.user][max(0, t - 3) : t]
            if recent:
                assert t >= len(split.train[ex.user]) - recent  # one of the user's 2 latest
            assert len(set(ex.candidates)) == 4
            assert not (set(ex.candidates) - {ex.target}) & stream.touched[ex.user]
    assert len(seen_users) > len(split.train) // 2
    for ex in stream.validation:
        assert ex.target == split.validation[ex.user]
        assert list(ex.history) == split.train[ex.user][-3:]


def test_recent_sampling_draws_users_uniformly_not_by_their_interaction_count(small_data):
    from collections import Counter

    from rcllm.data.dataset import Dataset

    heavy = {"heavy": [f"{i}" for i in range(40)], **{f"light{k}": [f"{k}", f"{k + 1}", f"{k + 2}", f"{k + 3}"]
                                                     for k in range(9)}}  # fmt: skip
    items = {str(i): {"id": str(i), "title": f"Item {i}"} for i in range(60)}
    rows = [(u, item, float(t)) for u, seq in heavy.items() for t, item in enumerate(seq)]
    data = Dataset("skewed", items, rows)
    per_user = lambda stream: Counter(ex.user for step in range(300) for ex in stream.batch(step, 4))  # noqa: E731
    uniform_pairs = per_user(ExampleStream(data, history=2, candidates=4, seed=0, val_users=2, recent=0))
    recent = per_user(ExampleStream(data, history=2, candidates=4, seed=0, val_users=2, recent=3))
    assert uniform_pairs["heavy"] > 0.6 * 1200  # 37 of the 46 training positions are the heavy user's
    assert 0.05 * 1200 < recent["heavy"] < 0.16 * 1200  # one user in ten
    with pytest.raises(ValueError, match="recent"):
        ExampleStream(data, history=2, candidates=4, seed=0, val_users=2, recent=-1)


def test_example_stream_is_a_function_of_seed_and_step(small_data):
    a = ExampleStream(small_data, history=3, candidates=4, seed=0, val_users=5)
    b = ExampleStream(small_data, history=3, candidates=4, seed=0, val_users=5)
    assert a.batch(7, 3) == b.batch(7, 3) and a.validation == b.validation
    assert a.batch(7, 3) != a.batch(8, 3)
    slots = [ex.positive for step in range(100) for ex in a.batch(step, 4)]
    assert set(slots) == {0, 1, 2, 3}  # the positive's place is shuffled


def test_examples_are_encoded_by_the_serving_prompt_code(small_data, ranker):
    stream = ExampleStream(small_data, history=3, candidates=4, seed=0, val_users=2)
    encoder = PromptEncoder(ranker, small_data.items)
    ex = stream.batch(0, 1)[0]
    prompt = encoder.encode(ex)
    segments, _ = ranker.segments(*encoder.texts_of(ex))
    assert torch.equal(prompt.ids, torch.cat([s.token_ids for s in segments]))
    assert prompt.target == ex.positive and prompt.layout[0][0] == "system"


def test_too_few_interactions_for_a_split_is_a_clear_error():
    data = make_synthetic(n_items=30, n_users=5, n_interactions_per_user=(2, 2), seed=0)
    with pytest.raises(ValueError, match="3 interactions"):
        ExampleStream(data, history=3, candidates=4, seed=0, val_users=2)


# --- the loop ---------------------------------------------------------------------------------


def test_bad_settings_are_refused_before_any_work(tmp_path, tiny_models, small_data):
    for bad, message in [
        (dict(candidates=27), "2 to 26"),
        (dict(method="qlora"), "unknown method"),
        (dict(block_aware="sometimes"), "block-aware"),
        (dict(schedule="step"), "schedule"),
        (dict(train_layers=3), "has 2 decoder layers"),
        (dict(checkpoint_minutes=-1), "checkpoint-minutes"),
    ]:
        with pytest.raises(ValueError, match=message):
            train(_settings(tmp_path, tiny_models["llama"], **bad), dataset=small_data)
    with pytest.raises(ValueError, match="unknown dataset"):
        train(_settings(tmp_path, tiny_models["llama"], dataset="ml-10m"))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(_settings(tmp_path, tiny_models["llama"], resume=True), dataset=small_data)
    assert not (tmp_path / "model").exists()


def test_saved_model_loads_and_ranks_with_report_and_plot(tmp_path, tiny_models, small_data):
    result = train(_settings(tmp_path, tiny_models["llama"], method="lora", block_aware="on"), dataset=small_data)
    out = tmp_path / "model"
    assert result.out == out
    report = json.loads((out / "training.json").read_text())
    assert report["steps"] == 4 and len(report["losses"]) == 4
    assert [e["step"] for e in report["evals"]] == [0, 2, 4]
    assert set(report["final"]["val"]) == {"none", "contextual", "reuse_none"}
    assert report["data"]["validation_users"] == 3 and report["machine"]["torch"] == torch.__version__
    assert (out / "training.png").stat().st_size > 1000
    assert _leftovers(tmp_path) == [] and not checkpoint_dir(out).exists()
    lm = load_model(out)
    assert lm.fingerprint != load_model(tiny_models["llama"]).fingerprint  # the adapter was merged in
    ranker = Ranker(BlockEngine(lm), PromptBuilder(lm.tokenizer))
    assert sorted(ranker.rank(HISTORY, CANDIDATES).order) == list(range(len(CANDIDATES)))


def test_adapter_only_folder_loads_as_the_merged_model_and_guards_its_base(tmp_path, tiny_models, small_data):
    from rcllm.engine.models import ADAPTER_FILE
    from rcllm.engine.prompt import model_template

    base = tiny_models["llama"]
    settings = dict(method="lora", block_aware="mix", instruction="\nAnswer:", categories_last=True)
    train(_settings(tmp_path / "merged", base, **settings), dataset=small_data)
    train(_settings(tmp_path / "adapter", base, adapter_only=True, **settings), dataset=small_data)
    merged_dir, adapter_dir = tmp_path / "merged" / "model", tmp_path / "adapter" / "model"
    names = {p.name for p in adapter_dir.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", ADAPTER_FILE, "rcllm-template.json",
            "training.json"} <= names  # fmt: skip
    assert "config.json" not in names and "model.safetensors" not in names
    adapter_bytes = (adapter_dir / "adapter_model.safetensors").stat().st_size
    assert adapter_bytes < (merged_dir / "model.safetensors").stat().st_size / 3

    merged, adapted, plain = load_model(merged_dir), load_model(adapter_dir), load_model(base)
    assert adapted.path == str(adapter_dir) and adapted.fingerprint not in (plain.fingerprint, merged.fingerprint)
    assert load_model(adapter_dir).fingerprint == adapted.fingerprint  # a stable identity for caches
    assert model_template(adapted.path) == model_template(merged.path)
    assert model_template(adapted.path).categories_last and model_template(adapted.path).instruction == "\nAnswer:"
    for name, weight in merged.model.state_dict().items():  # the same merge, at load instead of at the end
        torch.testing.assert_close(adapted.model.state_dict()[name], weight, rtol=0, atol=1e-6, msg=name)
    changed = [n for n, w in plain.model.state_dict().items() if not torch.equal(w, adapted.model.state_dict()[n])]
    assert any("q_proj" in n for n in changed)  # the adapter was applied, not skipped

    description = json.loads((adapter_dir / ADAPTER_FILE).read_text())
    # peft's config names the base as the run was given it, not the folder it was loaded from
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == description["base"]
    assert description["base"] == str(Path(base).resolve()) and description["base_fingerprint"] == plain.fingerprint
    # the base's file bytes differ (another conversion) but its values are the same: it loads, same identity
    (adapter_dir / ADAPTER_FILE).write_text(json.dumps({**description, "base_fingerprint": "0" * 64}))
    elsewhere = load_model(adapter_dir)
    assert torch.equal(elsewhere.model.model.layers[0].self_attn.q_proj.weight,
                       adapted.model.model.layers[0].self_attn.q_proj.weight)  # fmt: skip
    # its values changed too: refused
    (adapter_dir / ADAPTER_FILE).write_text(json.dumps({**description, "base_fingerprint": "0" * 64,
                                                        "base_state": "1" * 64}))  # fmt: skip
    with pytest.raises(ValueError, match="no longer applies"):
        load_model(adapter_dir)
    (adapter_dir / ADAPTER_FILE).write_text(json.dumps(description))
    (adapter_dir / "adapter_model.safetensors").unlink()
    with pytest.raises(ValueError, match="incomplete"):
        load_model(adapter_dir)
    with pytest.raises(ValueError, match="--method lora"):
        train(_settings(tmp_path / "full", base, method="full", adapter_only=True), dataset=small_data)


def test_an_adapter_names_its_base_as_given_not_where_peft_loaded_it(tmp_path):
    """peft writes the folder its base was loaded from (for the embedded model, this machine's
    converted copy); the adapter folder names the base as the run was given it, in both files."""
    from rcllm.engine.models.adapter import ADAPTER_FILE, adapter_rank, read_adapter, write_adapter

    class SavesLikePeft:
        def save_pretrained(self, folder):
            (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/machine/cache/x", "r": 8}))
            (folder / "adapter_model.safetensors").write_bytes(b"")
            (folder / "README.md").write_text("model card")

    write_adapter(tmp_path, SavesLikePeft(), "smollm2-135m", "f" * 64, "s" * 64)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["base_model_name_or_path"] == "smollm2-135m"
    assert read_adapter(tmp_path).base == "smollm2-135m" and adapter_rank(tmp_path) == 8  # the rest of peft's config kept
    assert {p.name for p in tmp_path.iterdir()} == {"adapter_config.json", "adapter_model.safetensors", ADAPTER_FILE}


def test_an_adapter_only_run_from_an_adapter_trains_that_adapter_further(tmp_path, tiny_models, small_data):
    from safetensors.torch import load_file

    from rcllm.engine.models import ADAPTER_FILE
    from rcllm.engine.prompt import model_template

    base = tiny_models["llama"]
    first = tmp_path / "first" / "model"
    train(_settings(tmp_path / "first", base, method="lora", lora_rank=4, adapter_only=True, categories_last=True),
          dataset=small_data)
    with pytest.raises(ValueError, match="--lora-rank 4"):
        train(_settings(tmp_path / "bad", first, method="lora", adapter_only=True), dataset=small_data)
    result = train(_settings(tmp_path / "second", first, method="lora", lora_rank=4, adapter_only=True, steps=2,
                             eval_every=2), dataset=small_data)  # fmt: skip
    second = result.out
    # the same base, one adapter: not an adapter stacked on the first one's merged weights
    assert json.loads((second / ADAPTER_FILE).read_text())["base"] == str(Path(base).resolve())
    before, after = load_file(first / "adapter_model.safetensors"), load_file(second / "adapter_model.safetensors")
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert model_template(second).categories_last  # the template goes on with the adapter
    assert result.report["examples"]["first_step"] == 4  # and its example stream
    assert load_model(second).fingerprint != load_model(first).fingerprint


def test_learning_rate_warms_up_then_follows_its_schedule():
    from rcllm.train.settings import lr_factor

    steps = 200  # warm-up: 20 steps
    for schedule in ("cosine", "linear", "constant"):
        f = [lr_factor(s, steps, schedule) for s in range(steps)]
        assert f[0] == pytest.approx(1 / 20) and f[19] == 1.0
        assert all(a <= b for a, b in zip(f[:20], f[1:20]))
        if schedule == "constant":
            assert set(f[19:]) == {1.0}
        else:
            assert all(a > b for a, b in zip(f[20:], f[21:]))  # strictly decaying after the warm-up
            assert 0 < f[-1] < 0.02 and f[20] > 0.98
    assert lr_factor(110, steps, "linear") == pytest.approx(0.5, abs=0.01)
    assert lr_factor(110, steps, "cosine") == pytest.approx(0.5, abs=0.02)
    assert lr_factor(0, 1, "cosine") == 1.0  # a one-step run is all warm-up


@pytest.mark.parametrize("method", ["full", "lora"])
def test_train_layers_changes_only_the_top_layers(tmp_path, tiny_models, small_data, method):
    settings = _settings(tmp_path, tiny_models["llama"], method=method, train_layers=1, block_aware="mix")
    result = train(settings, dataset=small_data)
    assert result.report["model"]["trainable_parameters"] < result.report["model"]["parameters"]
    saved = load_model(result.out).model.state_dict()
    original = load_model(tiny_models["llama"]).model.state_dict()
    assert saved.keys() == original.keys()
    changed = {k for k in saved if not torch.equal(saved[k], original[k])}
    assert changed and all(k.startswith(("model.layers.1.", "model.norm.")) for k in changed), sorted(changed)
    assert any(k.startswith("model.layers.1.self_attn.") for k in changed)


def test_zero_steps_only_evaluates_and_saves(tmp_path, tiny_models, small_data):
    result = train(_settings(tmp_path, tiny_models["llama"], steps=0), dataset=small_data)
    assert result.report["steps"] == 0 and [e["step"] for e in result.report["evals"]] == [0]
    saved, original = load_model(result.out).model.state_dict(), load_model(tiny_models["llama"]).model.state_dict()
    assert saved.keys() == original.keys() and all(torch.equal(saved[k], original[k]) for k in saved)


def test_interrupt_saves_a_checkpoint_and_resume_finishes_the_same_run(tmp_path, tiny_models, small_data):
    settings = _settings(tmp_path, tiny_models["llama"], steps=5)

    def stop_after_3(step, total, logs):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted) as stopped:
        train(settings, dataset=small_data, progress=stop_after_3)
    ckpt = checkpoint_dir(tmp_path / "model")
    assert stopped.value.step == 3 and stopped.value.checkpoint == ckpt
    assert ckpt.is_dir() and not (tmp_path / "model").exists() and _leftovers(tmp_path) == []
    with pytest.raises(ValueError, match="--resume"):
        train(settings, dataset=small_data)

    resumed = train(_settings(tmp_path, tiny_models["llama"], steps=5, resume=True), dataset=small_data)
    straight = train(_settings(tmp_path / "b", tiny_models["llama"], steps=5), dataset=small_data)
    assert resumed.report["steps"] == 5 and resumed.report["time"]["interruptions"] == 1
    assert [e["step"] for e in resumed.report["evals"]] == [0, 2, 4, 5]
    assert resumed.report["losses"] == pytest.approx(straight.report["losses"], abs=1e-5)
    assert not ckpt.exists() and _leftovers(tmp_path) == []


def test_a_run_killed_without_warning_resumes_from_its_last_periodic_checkpoint(tmp_path, tiny_models, small_data):
    # checkpoint after every step; then the process "dies" at step 3: an error the loop does not catch,
    # like a machine shut down under it, so nothing is saved on the way out
    settings = _settings(tmp_path, tiny_models["llama"], steps=5, checkpoint_minutes=1e-9)

    def die_after_3(step, total, logs):
        if step == 3:
            raise SystemError("machine lost")

    with pytest.raises(SystemError):
        train(settings, dataset=small_data, progress=die_after_3)
    ckpt = checkpoint_dir(tmp_path / "model")
    assert json.loads((ckpt / "state.json").read_text())["step"] == 3 and not (tmp_path / "model").exists()
    with pytest.raises(ValueError, match="--resume"):
        train(settings, dataset=small_data)
    resumed = train(_settings(tmp_path, tiny_models["llama"], steps=5, resume=True), dataset=small_data)
    straight = train(_settings(tmp_path / "b", tiny_models["llama"], steps=5, checkpoint_minutes=0), dataset=small_data)
    assert resumed.report["losses"] == pytest.approx(straight.report["losses"], abs=1e-5)
    assert [e["step"] for e in resumed.report["evals"]] == [0, 2, 4, 5]
    assert not ckpt.exists() and _leftovers(tmp_path) == []
    assert not checkpoint_dir(tmp_path / "b" / "model").exists()


def test_resume_refuses_changed_settings(tmp_path, tiny_models, small_data):
    def stop_at_1(step, total, logs):
        if step == 1:
            raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted):
        train(_settings(tmp_path, tiny_models["llama"]), dataset=small_data, progress=stop_at_1)
    with pytest.raises(ValueError, match="candidates"):
        train(_settings(tmp_path, tiny_models["llama"], candidates=5, resume=True), dataset=small_data)


def test_out_folder_of_something_else_is_not_overwritten(tmp_path, tiny_models, small_data):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="refusing to overwrite"):
        train(_settings(tmp_path, tiny_models["llama"]), dataset=small_data)
    assert (tmp_path / "model" / "notes.txt").read_text() == "mine"


# --- learning -------------------------------------------------------------------------------


def _one_taste_population():
    """Synthetic users whose items are mostly Space Opera, and all 16 categories' items.

    For them the synthetic rule (the next item shares the history's category) reads "choose the
    Space Opera candidate": a random-weight 2-layer model learns to tie that content to its label
    within ~50 steps, while learning to compare candidates with the history takes it thousands.
    """
    from rcllm.data.dataset import Dataset

    data = make_synthetic(n_items=160, n_users=1600, n_interactions_per_user=(6, 10), n_clusters=16, seed=0)
    category = {i: item["categories"][0] for i, item in data.items.items()}
    fans = {
        u for u, seq in data.user_sequences().items() if sum(category[i] == "Space Opera" for i in seq) >= 0.7 * len(seq)
    }
    return Dataset("space-opera-fans", data.items, [row for row in data.interactions if row[0] in fans])


def test_full_fine_tuning_lifts_a_random_model_from_chance(tmp_path, tiny_models):
    settings = _settings(
        tmp_path, tiny_models["llama"], steps=100, batch=32, lr=3e-3, history=1, block_aware="off",
        eval_every=100, val_users=32,
    )
    report = train(settings, dataset=_one_taste_population()).report
    before, after = report["evals"][0]["val"], report["final"]["val"]
    assert report["data"]["validation_users"] == 32  # chance HR@1 with 4 candidates: 0.25
    assert min(after[c]["hr@1"] for c in ("none", "contextual")) >= 0.45
    assert after["none"]["hr@1"] - before["none"]["hr@1"] >= 0.2
    assert sum(report["losses"][-20:]) / 20 < 0.9 < sum(report["losses"][:10]) / 10


def _mixed_taste_population():
    """Synthetic users with one or two favourite categories out of four, drawn at random: across
    users every category is as likely to be chosen next, so an item's text alone says nothing about
    whether it is the positive. Only comparing a candidate with the history does."""
    return make_synthetic(n_items=160, n_users=1600, n_interactions_per_user=(6, 10), n_clusters=4, seed=0)


@pytest.mark.xfail(
    strict=True,
    reason="block-aware training does not yet teach a model to compare a cached candidate with a cached "
    "history: the fresh label token would have to do the whole comparison (issue 18); a random 2-layer "
    "model stays at chance under reuse in 100 steps, and so did the 135M model at every CPU budget tried",
)
def test_block_aware_training_makes_reuse_rank_by_the_history(tmp_path, tiny_models):
    """Trained under the attention of cached reuse on a rule that needs the history, the model
    ranks when served with every block cached and nothing recomputed (``none``)."""
    settings = _settings(
        tmp_path, tiny_models["llama"], steps=100, batch=32, lr=3e-3, history=2, block_aware="on",
        eval_every=100, val_users=32, amp="off",
    )
    report = train(settings, dataset=_mixed_taste_population()).report
    before, after = report["evals"][0]["val"], report["final"]["val"]
    assert after["reuse_none"]["hr@1"] >= 0.45  # chance with 4 candidates: 0.25
    assert after["reuse_none"]["hr@1"] - before["reuse_none"]["hr@1"] >= 0.2


# --- the command ------------------------------------------------------------------------------


def _cli():
    import typer

    from rcllm.cli.finetune import register

    app = typer.Typer()

    @app.callback()
    def root() -> None:
        """rcllm"""

    register(app)
    return app


def test_finetune_command_trains_and_reports(tmp_path, tiny_models):
    from typer.testing import CliRunner

    args = ["finetune", "--dataset", "synthetic", "--model", str(tiny_models["llama"]), "--out", str(tmp_path / "m"),
            "--method", "full", "--steps", "2", "--batch", "1", "--history", "2", "--candidates", "4",
            "--val-users", "2", "--block-aware", "mix"]  # fmt: skip
    result = CliRunner().invoke(_cli(), args)
    assert result.exit_code == 0, result.output
    assert "hr@10" in result.output
    report = json.loads((tmp_path / "m" / "training.json").read_text())
    # mix: step 0 block-aware, step 1 causal; the result names each half's loss
    split = report["final"]["train_loss_by_attention"]
    assert split == pytest.approx({"causal": report["losses"][1], "block-aware": report["losses"][0]})
    assert f"block-aware steps {report['losses'][0]:.3f}" in " ".join(result.output.split())  # rich wraps lines


def test_losses_are_split_by_the_attention_of_their_step():
    from rcllm.train.report import losses_by_attention, mean_by_attention

    losses = [1.0, 2.0, 4.0, 8.0, 16.0]  # mix: steps 0, 2, 4 block-aware
    assert losses_by_attention(losses, "mix") == {"causal": 5.0, "block-aware": 7.0}
    assert losses_by_attention(losses, "mix", start=2) == {"causal": 8.0, "block-aware": 10.0}
    assert list(losses_by_attention(losses[:1], "mix")) == ["block-aware"]
    assert list(losses_by_attention(losses[:2], "mix")) == ["causal", "block-aware"]
    assert losses_by_attention(losses, "off") == {"causal": 6.2}
    assert losses_by_attention(losses, "on", start=3) == {"block-aware": 12.0}
    assert mean_by_attention([]) == {} and losses_by_attention(losses, "mix", start=5) == {}


def test_finetune_command_explains_bad_input(tmp_path, tiny_models):
    from typer.testing import CliRunner

    runner = CliRunner()
    base = ["finetune", "--model", str(tiny_models["llama"]), "--out", str(tmp_path / "m")]
    result = runner.invoke(_cli(), [*base, "--dataset", "nope"])
    assert result.exit_code == 2 and "unknown dataset" in result.output
    result = runner.invoke(_cli(), [*base, "--dataset", "synthetic", "--candidates", "30"])
    assert result.exit_code == 2 and "26" in result.output


def test_a_run_from_a_fine_tune_continues_its_example_stream(tmp_path):
    """stream_start: after the steps a start folder's training.json says it drew (also when it
    predates the record: its steps); 0 for a folder without one or with a broken one."""
    from rcllm.train.loop import stream_start

    assert stream_start(str(tmp_path)) == 0
    (tmp_path / "training.json").write_text(json.dumps({"steps": 120}))
    assert stream_start(str(tmp_path)) == 120
    (tmp_path / "training.json").write_text(json.dumps({"steps": 80, "examples": {"first_step": 120, "next_step": 200}}))
    assert stream_start(str(tmp_path)) == 200
    (tmp_path / "training.json").write_text("{not json")
    assert stream_start(str(tmp_path)) == 0
