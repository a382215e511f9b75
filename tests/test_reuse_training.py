"""Training for reuse: link tokens in the prompt, distillation from a plain prefill, the label
attention probe, and the template a fine-tuned model folder carries (tiny random-weight models)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rcllm.data.synthetic import make_synthetic
from rcllm.engine import BlockEngine, MemoryBlockCache, PromptBuilder, PromptTemplate, Ranker
from rcllm.engine.api import open_ranker
from rcllm.engine.models import load_model
from rcllm.engine.prompt import TEMPLATE_FILE, model_template
from rcllm.train import TrainSettings, train
from rcllm.train.examples import EncodedPrompt
from rcllm.train.forward import agreement_loss, answer_logits, collate, distill_loss, hidden_loss, label_attention

HISTORY = [f"Movie {i} ({1980 + i}); Drama" for i in range(3)]
CANDIDATES = [f"Film number {i}; Comedy, Action" for i in range(4)]


@pytest.fixture(scope="module")
def linked(tiny_models):
    lm = load_model(tiny_models["llama"])
    return Ranker(BlockEngine(lm), PromptBuilder(lm.tokenizer, PromptTemplate(link_tokens=2)))


def _encode(ranker, cases, target=0):
    out = []
    for history, candidates in cases:
        segments, _ = ranker.segments(history, candidates)
        ids = torch.cat([s.token_ids for s in segments])
        out.append(EncodedPrompt(ids, [(s.name, s.n_tokens) for s in segments], target, len(candidates)))
    return out


# --- link tokens ------------------------------------------------------------------------------


def test_link_tokens_follow_every_item_and_are_recomputed(linked):
    cache = MemoryBlockCache(linked.engine, linked.builder)
    segments, _ = linked.segments(HISTORY, CANDIDATES, cache)
    names = [s.name for s in segments]
    assert names[2:5] == ["item", "link", "label"] and names.count("link") == len(CANDIDATES)
    link = next(s for s in segments if s.name == "link")
    assert link.kv is None and link.n_tokens == 2  # fresh, like the label
    fresh = sum(s.n_tokens for s in segments if s.kv is None)
    result = linked.engine.forward(segments, "none")
    assert result.recomputed_tokens == fresh  # none recomputes the links too


def test_block_aware_training_forward_matches_reuse_with_link_tokens(linked):
    cases = [(HISTORY, CANDIDATES), (HISTORY[:1], CANDIDATES[::-1])]
    prompts = _encode(linked, cases)
    lm = linked.engine.lm
    with torch.no_grad():
        logits = answer_logits(lm.model, collate(prompts, block_aware=True), lm.inv_freq, lm.head_dim)
    cache = MemoryBlockCache(linked.engine, linked.builder)
    for row, (history, candidates) in enumerate(cases):
        expected = linked.engine.forward(linked.segments(history, candidates, cache)[0], "none").logits
        assert (logits[row] - expected).abs().max() < 1e-4


def test_link_text_must_stay_one_token_per_link(tiny_models):
    tokenizer = load_model(tiny_models["llama"]).tokenizer
    with pytest.raises(ValueError, match="one token"):
        PromptBuilder(tokenizer, PromptTemplate(link=" two words", link_tokens=2))
    with pytest.raises(ValueError, match=">= 0"):
        PromptBuilder(tokenizer, PromptTemplate(link_tokens=-1))
    assert PromptBuilder(tokenizer).link_ids().numel() == 0


def test_a_model_folder_template_is_read_back_and_a_bad_one_is_named(tmp_path):
    assert model_template(tmp_path) is None
    (tmp_path / TEMPLATE_FILE).write_text(json.dumps(PromptTemplate(link_tokens=3).to_dict()))
    assert model_template(tmp_path).link_tokens == 3
    (tmp_path / TEMPLATE_FILE).write_text('{"colour": "blue"}')
    with pytest.raises(ValueError, match="not a prompt template"):
        model_template(tmp_path)


# --- distillation -----------------------------------------------------------------------------


def test_distill_loss_is_zero_against_itself_and_grows_with_disagreement(linked):
    prompts = _encode(linked, [(HISTORY, CANDIDATES)])
    batch = collate(prompts, block_aware=True)
    labels = linked.builder.label_token_ids
    logits = torch.randn(1, 50_000)
    assert distill_loss(logits, logits, batch, labels, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    near, far = logits.clone(), logits.clone()
    near[0, labels[0]] += 0.5
    far[0, labels[0]] += 5.0
    small, large = (distill_loss(x, logits, batch, labels, 2.0).item() for x in (near, far))
    assert 0 < small < large
    off_label = logits.clone()
    off_label[0, 7] += 100.0  # not a label token: no part of the ranking
    assert distill_loss(off_label, logits, batch, labels, 2.0).item() == pytest.approx(0.0, abs=1e-6)


def _near_tie(linked) -> tuple:
    """A one-prompt batch, its label ids, a teacher whose top two labels are near-tied (0.30, 0.28)
    and a student with those two exchanged: a lost top choice."""
    batch = collate(_encode(linked, [(HISTORY, CANDIDATES)]), block_aware=True)
    labels = linked.builder.label_token_ids
    teacher = torch.full((1, 50_000), -20.0)
    for label, p in zip(labels[:4], (0.30, 0.28, 0.22, 0.20)):
        teacher[0, label] = torch.log(torch.tensor(p))
    swapped = teacher.clone()
    swapped[0, labels[0]], swapped[0, labels[1]] = teacher[0, labels[1]], teacher[0, labels[0]]
    return batch, labels, teacher, swapped


def test_agreement_loss_punishes_a_swapped_near_tie_that_the_kl_barely_sees(linked):
    batch, labels, teacher, swapped = _near_tie(linked)
    kl = distill_loss(swapped, teacher, batch, labels, 1.0).item()
    agree, kept = agreement_loss(swapped, teacher, batch, labels).item(), agreement_loss(teacher, teacher, batch, labels).item()
    assert kl < 5e-3 and agree > kept  # the KL hardly moves; the agreement term prefers the teacher's order
    assert agree == pytest.approx(-torch.log(torch.tensor(0.28)).item(), rel=1e-4)  # CE at the teacher's top label
    sure = teacher.clone()
    sure[0, labels[0]] = 10.0
    assert agreement_loss(sure, teacher, batch, labels).item() < 1e-4


def test_the_hinge_form_of_agreement_asks_only_for_a_lead_of_the_teachers_top_label(linked):
    batch, labels, teacher, swapped = _near_tie(linked)
    gap = torch.log(torch.tensor(0.30 / 0.28)).item()
    # the teacher's top trails the student's best other label by `gap`: the hinge is margin + gap
    assert agreement_loss(swapped, teacher, batch, labels, margin=1.0).item() == pytest.approx(1.0 + gap, rel=1e-4)
    assert agreement_loss(teacher, teacher, batch, labels, margin=1.0).item() == pytest.approx(1.0 - gap, rel=1e-4)
    led = teacher.clone()
    led[0, labels[0]] = teacher[0, labels[1]] + 1.5  # a lead past the margin: silent, however the rest is spread
    led[0, labels[3]] = -5.0
    assert agreement_loss(led, teacher, batch, labels, margin=1.0).item() == 0.0
    grad = swapped.clone().requires_grad_(True)
    agreement_loss(grad, teacher, batch, labels, margin=1.0).backward()
    moved = grad.grad[0].nonzero().flatten().tolist()
    assert sorted(moved) == sorted([labels[0], labels[1]])  # only the teacher's top and the student's runner-up


def test_an_agreement_term_trains_reuse_towards_the_teachers_top_choice(tmp_path, tiny_models, small_data):
    """--agree-weight: the term is trained and reported, and the student's reuse ends closer to
    its plain prefill's top choices than the same run without it."""
    data = small_data
    ranker = open_ranker(str(tiny_models["llama"]))
    prompts = _encode(ranker, [(HISTORY, CANDIDATES), (HISTORY[1:], CANDIDATES[::-1]), (HISTORY[:2], CANDIDATES[1:])])
    ids = ranker.builder.label_token_ids

    def run(weight: float) -> tuple[dict, float]:
        settings = TrainSettings(
            out=tmp_path / f"w{weight}", model=str(tiny_models["llama"]), teacher="self", method="full", steps=30,
            batch=4, lr=3e-3, history=2, candidates=4, block_aware="on", eval_every=30, val_users=2, amp="off",
            schedule="constant", recent=1, temperature=1.0, hidden_weight=0.0, distill_weight=0.0, agree_weight=weight,
        )
        report = train(settings, dataset=data).report
        lm = load_model(str(tmp_path / f"w{weight}"))
        with torch.no_grad():
            total = 0.0
            for p in prompts:
                reuse = answer_logits(lm.model, collate([p], True), lm.inv_freq, lm.head_dim)
                plain = answer_logits(lm.model, collate([p], False), lm.inv_freq, lm.head_dim)
                total += agreement_loss(reuse, plain, collate([p], True), ids).item()
        return report, total

    report, trained = run(4.0)
    agree = [p["agree"] for p in report["loss_parts"]]
    assert sum(agree[-5:]) < 0.5 * sum(agree[:5])
    untrained_report, untrained = run(0.0)
    assert "agree" not in untrained_report["loss_parts"][0]
    assert trained < untrained
    with pytest.raises(ValueError, match="--teacher"):
        train(TrainSettings(out=tmp_path / "x", model=str(tiny_models["llama"]), agree_weight=1.0), dataset=data)
    with pytest.raises(ValueError, match="--agree-weight"):
        train(TrainSettings(out=tmp_path / "x", model=str(tiny_models["llama"]), teacher="self", agree_margin=1.0), dataset=data)


def test_the_hinge_form_of_agreement_is_the_one_trained_and_it_falls(tmp_path, tiny_models, small_data):
    """--agree-margin reaches the loop's agreement term: at a margin of 50 nats no tiny model's lead
    comes close, so every reported value is the hinge (> 40), not a cross-entropy (ln 4 at a uniform
    guess); at 1 nat the term is trained down by half."""

    def parts(margin: float, steps: int) -> list[float]:
        settings = TrainSettings(
            out=tmp_path / f"m{margin}", model=str(tiny_models["llama"]), teacher="self", method="full", steps=steps,
            batch=4, lr=3e-3, history=2, candidates=4, block_aware="on", eval_every=steps, val_users=2, amp="off",
            schedule="constant", recent=1, temperature=1.0, hidden_weight=0.0, distill_weight=0.0, agree_weight=4.0,
            agree_margin=margin,
        )
        return [p["agree"] for p in train(settings, dataset=small_data).report["loss_parts"]]

    assert min(parts(50.0, 2)) > 40.0
    values = parts(1.0, 30)
    assert sum(values[-5:]) < 0.5 * sum(values[:5])


def test_hidden_loss_reads_only_the_fresh_tokens_and_weighs_every_dimension_alike(linked):
    prompts = _encode(linked, [(HISTORY, CANDIDATES)])
    batch = collate(prompts, block_aware=True)
    layout = prompts[0].layout
    names = [name for name, n in layout for _ in range(n)]
    assert batch.fresh[0].tolist() == [name in ("label", "link", "instruction") for name in names]
    torch.manual_seed(0)
    teacher = [torch.randn(1, len(names), 8) for _ in range(2)]
    teacher[0][..., 0] = teacher[0][..., 0] * 1000 + 5000  # one huge dimension, as real models have
    student = [t.clone() for t in teacher]
    assert hidden_loss(student, teacher, batch.fresh).item() == 0.0
    student[0][0, names.index("item")] += 10.0  # cached under reuse: not the student's to match
    assert hidden_loss(student, teacher, batch.fresh).item() == 0.0
    label = names.index("label")
    fresh_t = teacher[0][0][batch.fresh[0]]
    huge, small = student[0].clone(), student[0].clone()
    huge[0, label, 0] += fresh_t[:, 0].std()  # one spread off, in the huge dimension
    small[0, label, 1] += fresh_t[:, 1].std()  # one spread off, in an ordinary one
    errs = [hidden_loss([x, student[1]], teacher, batch.fresh).item() for x in (huge, small)]
    assert errs[0] > 0 and errs[0] == pytest.approx(errs[1], rel=1e-4)


def test_label_attention_splits_the_mass_of_each_label():
    layout = [("system", 2), ("history", 2), ("item", 2), ("label", 1), ("item", 1), ("label", 1), ("instruction", 1)]
    prompt = EncodedPrompt(torch.zeros(10, dtype=torch.long), layout, 0, 2)
    weights = torch.zeros(1, 10, 10)
    weights[0, 6, [0, 2, 4, 5]] = torch.tensor([0.1, 0.2, 0.3, 0.4])  # label 1: system, history, own item
    weights[0, 8, [1, 3, 4, 7]] = torch.tensor([0.25, 0.25, 0.25, 0.25])  # label 2: own item is token 7
    out = label_attention([weights], [prompt])
    assert out["own_item"] == [pytest.approx((0.7 + 0.25) / 2)]
    assert out["history"] == [pytest.approx((0.2 + 0.25) / 2)]
    assert out["system"] == [pytest.approx((0.1 + 0.25) / 2)]
    assert out["other_items"] == [pytest.approx(0.25 / 2)]


def test_distillation_pulls_the_block_aware_student_towards_the_teachers_plain_prefill(tmp_path, tiny_models):
    """With a teacher the block-aware steps learn the teacher's fresh hidden states and label
    distribution: both terms fall, and the student's reuse logits move towards the teacher's
    plain prefill on the training prompts. Without --teacher neither term exists."""
    data = make_synthetic(n_items=60, n_users=24, n_interactions_per_user=(5, 9), seed=0)
    settings = TrainSettings(
        out=tmp_path / "student", model=str(tiny_models["llama"]), teacher=str(tiny_models["qwen2"]),
        method="full", steps=40, batch=4, lr=3e-3, history=2, candidates=4, block_aware="on", eval_every=40,
        val_users=2, amp="off", schedule="constant", recent=1,
    )
    report = train(settings, dataset=data).report
    parts = report["loss_parts"]
    assert all({"ce", "kl", "hidden"} <= set(p) for p in parts)
    first = sum(p["hidden"] for p in parts[:5]) / 5
    last = sum(p["hidden"] for p in parts[-5:]) / 5
    assert last < 0.5 * first
    assert sum(p["kl"] for p in parts[-5:]) < sum(p["kl"] for p in parts[:5])
    assert len(report["grad_norms"]) == 40 and all(g > 0 for g in report["grad_norms"])
    attention = report["final"]["label_attention"]
    assert set(attention) == {"own_item", "history", "other_items", "system"} and len(attention["own_item"]) == 2


def test_a_self_teacher_pulls_reuse_towards_the_students_own_plain_prefill(tmp_path, tiny_models):
    """--teacher self: the target is the student's plain prefill at the current weights (no
    second model). The KL starts above 0 (a teacher read under reuse would make it 0) and falls,
    and after training the student's reuse is closer to its own plain prefill than before."""
    data = make_synthetic(n_items=60, n_users=24, n_interactions_per_user=(5, 9), seed=0)
    settings = TrainSettings(
        out=tmp_path / "student", model=str(tiny_models["llama"]), teacher="self", method="full", steps=30, batch=4,
        lr=3e-3, history=2, candidates=4, block_aware="on", eval_every=30, val_users=2, amp="off",
        schedule="constant", recent=1, temperature=1.0,
    )
    ranker = open_ranker(str(tiny_models["llama"]))
    prompts = _encode(ranker, [(HISTORY, CANDIDATES), (HISTORY[1:], CANDIDATES[::-1])])
    ids = ranker.builder.label_token_ids

    def gap(lm) -> float:  # KL(plain || reuse) of the label distributions on the probe prompts
        with torch.no_grad():
            reuse = answer_logits(lm.model, collate(prompts, True), lm.inv_freq, lm.head_dim)
            plain = answer_logits(lm.model, collate(prompts, False), lm.inv_freq, lm.head_dim)
        return distill_loss(reuse, plain, collate(prompts, True), ids, 1.0).item()

    report = train(settings, dataset=data).report
    kls = [p["kl"] for p in report["loss_parts"]]
    assert kls[0] > 1e-4 and sum(kls[-5:]) < 0.5 * sum(kls[:5])
    assert gap(load_model(str(tmp_path / "student"))) < gap(ranker.engine.lm)


def test_a_mutual_teacher_trains_the_plain_prefill_and_pulls_both_ways(tmp_path, tiny_models):
    """--teacher mutual: the plain prefill is trained with the label and towards reuse, with
    gradient (--teacher self holds it fixed). Both KL directions start above 0 and fall, the
    prefill's own cross-entropy falls, and the plain prefill ends closer to reuse than the same run
    with a self teacher leaves it."""
    data = make_synthetic(n_items=60, n_users=24, n_interactions_per_user=(5, 9), seed=0)
    ranker = open_ranker(str(tiny_models["llama"]))
    prompts = _encode(ranker, [(HISTORY, CANDIDATES), (HISTORY[1:], CANDIDATES[::-1])])
    ids = ranker.builder.label_token_ids

    def run(teacher: str) -> tuple[dict, float]:
        settings = TrainSettings(
            out=tmp_path / teacher, model=str(tiny_models["llama"]), teacher=teacher, method="full", steps=30,
            batch=4, lr=3e-3, history=2, candidates=4, block_aware="on", eval_every=30, val_users=2, amp="off",
            schedule="constant", recent=1, temperature=1.0, hidden_weight=0.0, distill_weight=4.0,
        )
        report = train(settings, dataset=data).report
        lm = load_model(str(tmp_path / teacher))
        with torch.no_grad():  # KL(reuse || plain): how far the prefill is from what reuse computes
            reuse = answer_logits(lm.model, collate(prompts, True), lm.inv_freq, lm.head_dim)
            plain = answer_logits(lm.model, collate(prompts, False), lm.inv_freq, lm.head_dim)
        return report, distill_loss(plain, reuse, collate(prompts, False), ids, 1.0).item()

    report, mutual_gap = run("mutual")
    parts = report["loss_parts"]
    back = [p["kl_back"] for p in parts]
    plain_ce = [p["ce_plain"] for p in parts]
    assert back[0] > 1e-4 and sum(back[-5:]) < 0.5 * sum(back[:5])
    assert sum(plain_ce[-5:]) < sum(plain_ce[:5])
    self_report, self_gap = run("self")
    assert "kl_back" not in self_report["loss_parts"][0]
    assert mutual_gap < self_gap


def test_a_teacher_of_another_shape_is_refused_before_training(tmp_path, tiny_models):
    from conftest import tiny_model_dir

    tokenizer = load_model(tiny_models["llama"]).tokenizer
    deeper = tiny_model_dir("llama", tmp_path / "deeper", tokenizer, num_hidden_layers=3)
    data = make_synthetic(n_items=60, n_users=24, n_interactions_per_user=(5, 9), seed=0)
    settings = TrainSettings(
        out=tmp_path / "student", model=str(tiny_models["llama"]), teacher=str(deeper), method="full", steps=1,
        batch=1, history=2, candidates=4, block_aware="on", val_users=1,
    )
    with pytest.raises(ValueError, match="3 layers"):
        train(settings, dataset=data)
    settings.hidden_weight = 0.0  # the KL term alone needs only the same token ids
    train(settings, dataset=data)
    with pytest.raises(ValueError, match="block-aware"):
        train(TrainSettings(out=tmp_path / "x", model=str(tiny_models["llama"]), teacher=str(deeper),
                            block_aware="off"), dataset=data)


def test_finetune_records_its_template_and_serving_follows_it(tmp_path, tiny_models):
    data = make_synthetic(n_items=60, n_users=24, n_interactions_per_user=(5, 9), seed=0)
    settings = TrainSettings(
        out=tmp_path / "m", model=str(tiny_models["llama"]), method="full", steps=1, batch=1, history=2,
        candidates=4, block_aware="on", val_users=1, link_tokens=2,
    )
    train(settings, dataset=data)
    assert json.loads((tmp_path / "m" / TEMPLATE_FILE).read_text())["link_tokens"] == 2
    ranker = open_ranker(str(tmp_path / "m"))
    assert ranker.builder.template.link_tokens == 2
    # a second run from that folder keeps its links unless told otherwise
    again = TrainSettings(**{**settings.__dict__, "out": tmp_path / "m2", "model": str(tmp_path / "m"),
                             "link_tokens": None})
    train(again, dataset=data)
    assert model_template(tmp_path / "m2").link_tokens == 2
    # the second run continues the first one's example stream rather than drawing its examples again
    reports = [json.loads((tmp_path / m / "training.json").read_text())["examples"] for m in ("m", "m2")]
    assert reports == [{"first_step": 0, "next_step": 1}, {"first_step": 1, "next_step": 2}]
    assert open_ranker(str(tiny_models["llama"])).builder.template.link_tokens == 0
    # --instruction: a shorter question, recorded and served, links kept from the start model
    short = TrainSettings(**{**again.__dict__, "out": tmp_path / "m3", "model": str(tmp_path / "m2"),
                             "instruction": "\nAnswer:"})
    train(short, dataset=data)
    ranker = open_ranker(str(tmp_path / "m3"))
    assert (ranker.builder.template.instruction, ranker.builder.template.link_tokens) == ("\nAnswer:", 2)
    segments, _ = ranker.segments(["a"], ["b", "c"])
    assert ranker.builder.tokenizer.decode(segments[-1].token_ids) == "\nAnswer:"
    # --categories-last: every item block ends with its categories, in training and serving alike
    last = TrainSettings(**{**short.__dict__, "out": tmp_path / "m4", "model": str(tmp_path / "m3"),
                            "instruction": None, "categories_last": True})
    train(last, dataset=data)
    ranker = open_ranker(str(tmp_path / "m4"))
    assert ranker.builder.template.categories_last and ranker.builder.template.instruction == "\nAnswer:"
    item = next(iter(data.items.values()))
    assert ranker.builder.item_text(item).endswith("; " + ", ".join(item["categories"]))
    with pytest.raises(ValueError, match="--instruction: empty"):
        TrainSettings(**{**short.__dict__, "instruction": "  "}).check()


@pytest.mark.parametrize("mode", ["on", "off"])
def test_a_training_step_uses_the_attention_its_mode_names(tmp_path, tiny_models, mode):
    """The loss the loop records for step 0 is the block-aware loss under ``on`` and the causal
    one under ``off``: a loop that silently trained causally would record the other number."""
    from rcllm.train.examples import ExampleStream, PromptEncoder
    from rcllm.train.forward import label_loss

    data = make_synthetic(n_items=60, n_users=24, n_interactions_per_user=(5, 9), seed=0)
    settings = TrainSettings(
        out=tmp_path / "m", model=str(tiny_models["llama"]), method="full", steps=1, batch=4, history=2,
        candidates=4, block_aware=mode, val_users=1, amp="off", recent=3,
    )
    recorded = train(settings, dataset=data).report["losses"][0]
    lm = load_model(tiny_models["llama"])
    stream = ExampleStream(data, 2, 4, 0, 1, 3)
    encoder = PromptEncoder(Ranker(BlockEngine(lm), PromptBuilder(lm.tokenizer)), data.items)
    prompts = [encoder.encode(e) for e in stream.batch(0, 4)]
    losses = {}
    with torch.no_grad():
        for aware in (True, False):
            batch = collate(prompts, aware)
            logits = answer_logits(lm.model, batch, lm.inv_freq, lm.head_dim)
            losses[aware] = label_loss(logits, batch, PromptBuilder(lm.tokenizer).label_token_ids).item()
    assert abs(losses[True] - losses[False]) > 1e-3
    assert recorded == pytest.approx(losses[mode == "on"], abs=1e-5)


# --- match loss at the label tokens ------------------------------------------------------------


def test_match_scores_read_each_label_token_as_a_plain_prefill_computes_it(linked):
    """The batch's label positions are the label tokens, and the match score there is the stock
    model's logit(yes) - logit(no) at that token (plain prefill)."""
    from rcllm.train.forward import match_scores

    prompts = _encode(linked, [(HISTORY, CANDIDATES)])
    lm, builder = linked.engine.lm, linked.builder
    batch = collate(prompts, block_aware=False)
    label_ids = {int(builder.label_ids(slot)[-1]) for slot in range(len(CANDIDATES))}
    assert {int(batch.ids[0, p]) for p in batch.labels[0]} == label_ids
    yes, no = builder.match_token_ids()
    with torch.no_grad():
        states: list = []
        answer_logits(lm.model, batch, lm.inv_freq, lm.head_dim, labels=states)
        scores = match_scores(lm.model, states[0], (yes, no))
        stock = lm.model(batch.ids).logits[0]
    expected = stock[batch.labels[0], yes] - stock[batch.labels[0], no]
    assert scores.shape == (1, len(CANDIDATES))
    assert (scores[0] - expected).abs().max() < 1e-4


def test_match_loss_is_trained_reported_and_probed_under_reuse(tmp_path, tiny_models):
    data = make_synthetic(n_items=60, n_users=24, n_interactions_per_user=(5, 9), seed=0)
    settings = TrainSettings(
        out=tmp_path / "m", model=str(tiny_models["llama"]), method="full", steps=30, batch=4, lr=3e-3, history=2,
        candidates=4, block_aware="on", eval_every=30, val_users=4, amp="off", schedule="constant", recent=1,
        match_weight=1.0,
    )
    report = train(settings, dataset=data).report
    match = [p["match"] for p in report["loss_parts"]]
    assert len(match) == 30 and sum(match[-5:]) < sum(match[:5])
    assert set(report["evals"][-1]["match_hr1"]) == {"plain", "reuse"}
    without = TrainSettings(**{**settings.__dict__, "out": tmp_path / "m2", "steps": 1, "match_weight": 0.0})
    assert "match" not in train(without, dataset=data).report["loss_parts"][0]
    with pytest.raises(ValueError, match="match-weight"):
        TrainSettings(out=tmp_path / "x", match_weight=-1.0).check()


# --- curriculum: recomputed item tails ----------------------------------------------------------


def test_recomputed_tails_run_from_a_plain_prefill_to_reuse_without_correction(linked):
    """Tails of share 1 are a plain causal prefill, share 0 is serving with ``none``; in between
    the logits lie elsewhere (the tails read the history)."""
    from rcllm.train.masks import with_recomputed_tails

    prompts = _encode(linked, [(HISTORY, CANDIDATES), (HISTORY[:2], CANDIDATES[::-1])])
    lm = linked.engine.lm
    with torch.no_grad():
        run = {s: answer_logits(lm.model, collate(prompts, True, tails=s), lm.inv_freq, lm.head_dim) for s in (0, 0.5, 1)}
        plain = answer_logits(lm.model, collate(prompts, False), lm.inv_freq, lm.head_dim)
        none = answer_logits(lm.model, collate(prompts, True), lm.inv_freq, lm.head_dim)
    assert (run[1] - plain).abs().max() < 1e-4
    assert (run[0] - none).abs().max() < 1e-6
    assert min((run[0.5] - plain).abs().max(), (run[0.5] - none).abs().max()) > 1e-4
    layout = prompts[0].layout
    half = with_recomputed_tails(layout, 0.5)
    assert sum(n for _, n in half) == sum(n for _, n in layout)
    items = [n for name, n in layout if name == "item"]
    tails = [n for name, n in half if name == "item_tail"]
    assert tails == [-(-n // 2) for n in items]
    with pytest.raises(ValueError, match="within"):
        with_recomputed_tails(layout, 1.5)


def test_the_curriculum_shrinks_the_tails_step_by_step(tmp_path):
    settings = TrainSettings(out=tmp_path / "x", block_aware="on", curriculum=4)
    assert [settings.tails_at(s) for s in range(6)] == [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    assert TrainSettings(out=tmp_path / "x").tails_at(0) == 0.0
    with pytest.raises(ValueError, match="curriculum"):
        TrainSettings(out=tmp_path / "x", block_aware="off", curriculum=4).check()


def test_a_tail_floor_trains_exactly_what_tail_k_serves(linked):
    """``--tail-floor K``: the block-aware forward with the last K tokens of every item recomputed
    equals the engine's ``tail:K`` policy over cached blocks (the history block, behind the system
    prefix where it was computed, is exact and not recomputed by either)."""
    from rcllm.train.masks import with_recomputed_tails

    cases = [(HISTORY, CANDIDATES), (HISTORY[:2], CANDIDATES[::-1])]
    prompts = _encode(linked, cases)
    lm = linked.engine.lm
    cache = MemoryBlockCache(linked.engine, linked.builder)
    for k in (1, 3, 100):
        with torch.no_grad():
            logits = answer_logits(lm.model, collate(prompts, True, floor=k), lm.inv_freq, lm.head_dim)
        for row, (history, candidates) in enumerate(cases):
            expected = linked.engine.forward(linked.segments(history, candidates, cache)[0], f"tail:{k}").logits
            assert (logits[row] - expected).abs().max() < 1e-4, k
    with torch.no_grad():
        none = answer_logits(lm.model, collate(prompts, True), lm.inv_freq, lm.head_dim)
        floor = answer_logits(lm.model, collate(prompts, True, floor=3), lm.inv_freq, lm.head_dim)
    assert (floor - none).abs().max() > 1e-4  # the tails read the history
    layout = prompts[0].layout
    items = [n for name, n in layout if name == "item"]
    assert [n for name, n in with_recomputed_tails(layout, 0.0, 3) if name == "item_tail"] == [min(3, n) for n in items]
    # the larger of the share and the floor wins
    assert [n for name, n in with_recomputed_tails(layout, 1.0, 3) if name == "item_tail"] == items
    with pytest.raises(ValueError, match="negative"):
        with_recomputed_tails(layout, 0.0, -1)


def test_a_tail_floor_needs_block_aware_steps_and_validates_its_policy(tmp_path, tiny_models):
    with pytest.raises(ValueError, match="tail-floor"):
        TrainSettings(out=tmp_path / "x", block_aware="off", tail_floor=2).check()
    with pytest.raises(ValueError, match="tail-floor"):
        TrainSettings(out=tmp_path / "x", block_aware="on", tail_floor=-1).check()
    settings = TrainSettings(
        out=tmp_path / "floor", model=str(tiny_models["llama"]), method="full", dataset="synthetic", steps=2, batch=2, history=3,
        candidates=4, val_users=4, eval_every=2, block_aware="on", curriculum=1, tail_floor=2, lr=1e-3,
    )
    data = make_synthetic(n_items=60, n_users=24, n_interactions_per_user=(5, 9), seed=0)
    report = train(settings, dataset=data).report
    val = report["final"]["val"]
    assert {"reuse_none", "reuse_tail:2"} <= set(val)
    assert 0.0 <= val["reuse_tail:2"]["top1_agree"] <= 1.0
    assert report["settings"]["tail_floor"] == 2
