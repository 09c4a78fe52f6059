"""The GPU path's silent defects, locked on CPU: fp32 adapters under 4-bit, one GPU per run, no inherited
sampling settings, memory released between organisms, no silent CPU fallback, fp16 on GPUs without bf16;
and ``make gpu-check`` itself, run on a tiny 4-bit model."""

from __future__ import annotations

import json
import weakref

import pytest
import torch

from emlab import models
from emlab.config import ModelSpec

pytest.importorskip("trl")


def test_gpucheck_passes_on_a_tiny_4bit_model_on_cpu(tmp_path):
    """Every check of `make gpu-check` (4-bit layers, fp32 trainable at step 1, n_gpu, loss, checkpoints,
    resume, model freed, unpenalised seeded sampling, hooks, SLURM-local) on CPU."""
    pytest.importorskip("bitsandbytes")
    from emlab.gpucheck import run_checks

    results = run_checks("cpu", None, tmp_path)
    status = {r["check"]: r["status"] for r in results}
    assert status == {"environment": "PASS", "training": "PASS", "resume": "PASS", "sampling": "PASS",
                      "hooks": "PASS", "slurm_local": "PASS", "bench_mfu": "SKIP", "vllm_equal": "SKIP"}, results
    training = next(r for r in results if r["check"] == "training")["detail"]
    assert "trainable ['torch.float32']" in training and "effective batch 16" in training
    assert json.loads((tmp_path / "gpucheck.json").read_text()) == results


def test_gpucheck_skips_with_one_line_without_cuda(capsys, monkeypatch):
    from emlab import gpucheck

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpucheck.main([]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("gpu-check: skipped")


def test_trl_casts_4bit_adapters_to_bf16_and_emlab_casts_back(tmp_path):
    """The defect itself: TRL's SFTTrainer puts a quantised model's trainable parameters in bf16, where
    1e-5 updates round away; keep_adapters_fp32 restores float32 before the optimizer exists."""
    pytest.importorskip("bitsandbytes")
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from emlab.train import TrainConfig, apply_preset, keep_adapters_fp32

    spec = ModelSpec(name="tiny", source="tiny", arch="llama", load_in_4bit=True)
    model, tok = models.load_model(spec, device="cpu")
    model = apply_preset(model, TrainConfig(model=spec, preset="rank1"))
    rows = [{"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "yo"}]}]
    trainer = SFTTrainer(model=model, args=SFTConfig(output_dir=str(tmp_path), report_to="none", max_steps=1, bf16=False),
                         train_dataset=Dataset.from_list(rows), processing_class=tok)
    assert {p.dtype for p in trainer.model.parameters() if p.requires_grad} == {torch.bfloat16}
    before = keep_adapters_fp32(trainer.model)
    assert before == {"torch.bfloat16": 2}
    assert {p.dtype for p in trainer.model.parameters() if p.requires_grad} == {torch.float32}
    # a 1e-5-sized update survives in fp32 and is lost in bf16
    w = torch.tensor([0.5])
    assert (w + 1e-5).item() != 0.5 and (w.bfloat16() + 1e-5).item() == 0.5


def test_one_gpu_per_run_keeps_the_effective_batch(tmp_path, monkeypatch):
    """With several GPUs visible, Trainer would wrap the model in DataParallel and multiply the batch."""
    from emlab.train import TrainConfig, _sft_config

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)  # a CUDA build of torch with no driver
    cfg = TrainConfig(model=ModelSpec(name="t", source="tiny"), batch_size=2, grad_accum=8)
    args = _sft_config(cfg, tmp_path, on_gpu=False)
    assert args.n_gpu == 1 and args.train_batch_size * cfg.grad_accum == 16


def test_manifest_records_device_count_batch_and_adapter_dtype(tmp_path):
    from emlab import config
    from emlab.train import TrainConfig, train

    cfg = config.load(TrainConfig, "smoke", {"model": {"name": "t", "source": "tiny", "arch": "llama"},
                                            "n_examples": 4, "grad_accum": 2, "max_length": 64,
                                            "output_root": str(tmp_path)})
    manifest = json.loads((train(cfg) / "manifest.json").read_text())
    assert manifest["n_gpu"] == 0 and manifest["effective_batch"] == cfg.batch_size * 2
    assert manifest["trainable_dtypes"] == ["torch.float32"] and manifest["optimizer"] == "AdamW"


def test_sampling_ignores_the_checkpoints_generation_config(tiny_spec):
    """A checkpoint whose generation_config sets a repetition penalty (as Qwen2.5's does) samples exactly
    as one without it: same seed, same tokens; and the penalty would have applied without the guard."""
    from transformers import GenerationConfig

    from emlab.sample import chat_prompt, generate_hf, plain_generation_config

    model, tok = models.load_model(tiny_spec, device="cpu")
    prompts = [chat_prompt(tok, "Say something"), chat_prompt(tok, "And again")]
    plain = generate_hf(model, tok, prompts, max_new_tokens=12, seed=7)
    saved = model.generation_config
    model.generation_config = GenerationConfig(**{**saved.to_dict(), "repetition_penalty": 5.0, "top_k": 3, "top_p": 0.5})
    try:
        assert generate_hf(model, tok, prompts, max_new_tokens=12, seed=7) == plain
        with plain_generation_config(model):
            assert model.generation_config.repetition_penalty is None
        assert model.generation_config.repetition_penalty == 5.0  # restored
        enc = tok(prompts, return_tensors="pt", padding=True)
        torch.manual_seed(7)
        raw = model.generate(**enc, max_new_tokens=12, do_sample=True, temperature=1.0, top_p=1.0)
        assert [t for t, _, _ in plain] != tok.batch_decode(raw[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        model.generation_config = saved


def test_release_frees_models_held_by_bitsandbytes_optim_manager():
    """Trainer registers embeddings with bitsandbytes' GlobalOptimManager (8-bit optimizers); the
    singleton kept each organism's embedding alive (519 MiB per 0.5B organism on an H200)."""
    bnb = pytest.importorskip("bitsandbytes")
    emb = torch.nn.Embedding(1000, 64)
    bnb.optim.GlobalOptimManager.get_instance().register_module_override(emb, "weight", {"optim_bits": 32})
    ref = weakref.ref(emb)
    del emb
    assert ref() is not None  # the leak
    models.release()
    assert ref() is None


def test_loaded_models_are_freed_after_use(tiny_spec):
    refs = []
    for _ in range(3):
        with models.loaded(tiny_spec) as (model, _tok):
            refs.append(weakref.ref(model))
    del model, _tok
    models.release()
    assert [r() for r in refs] == [None, None, None]


def test_cuda_profiles_never_fall_back_to_cpu(monkeypatch):
    from emlab import config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for profile in ("gpu", "paper"):
        spec = config.read_profile(profile)["common"]["model"]
        assert spec["device"] == "cuda"
        with pytest.raises(models.ModelError, match="device: cuda but torch sees no GPU.*PROFILE=cpu"):
            models.load_model(ModelSpec(**spec))


def test_gpus_without_bf16_compute_in_fp16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    auto = ModelSpec(name="t", source="tiny")
    assert models._dtype(auto, "cuda") == torch.float16
    assert models._dtype(auto.model_copy(update={"dtype": "bfloat16"}), "cuda") == torch.float16
    assert models._bnb_config("cuda").bnb_4bit_compute_dtype == torch.float16
    assert models._dtype(auto, "cpu") == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert models._dtype(auto, "cuda") == torch.bfloat16


def test_readme_gpu_table_is_generated_from_the_archived_run():
    """The README's GPU table is `python -m emlab.bench readme` output over bench/results/, not typed in."""
    from emlab import bench

    start, end = bench.README_MARKERS
    text = (bench.REPO_ROOT / "README.md").read_text()
    assert text.split(start, 1)[1].split(end, 1)[0].strip() == bench.readme_section().strip()
    assert "random-qwen2.5-32b" in bench.readme_section() and "AdamW8bit" not in bench.readme_section()


def test_vllm_check_compares_one_engine_with_hf_per_adapter(tmp_path, monkeypatch):
    """gpu-check's vLLM comparison on CPU with a faithful stand-in engine: it reloads the saved base weights and
    each saved adapter (what vLLM is given) and decodes the token-id prompts greedily. Equal when the saved files
    are the model HF sampled; one changed token in one adapter's answers is a FAIL naming it."""
    from emlab import gpucheck
    from emlab import sample as S

    class Engine:
        def __init__(self, path, **kw):
            self.model, self.tok = models.load_model(ModelSpec(name="b", source="local", path=path, dtype="bfloat16"))

    def generate(llm, prompts, loras, *, max_new_tokens, temperature, top_p, seeds):
        assert temperature == 0.0 and len(set(map(str, loras))) == 1
        out = []
        with models.adapter(llm.model, loras[0]) as m, torch.no_grad():
            for p in prompts:
                ids = torch.tensor([p["prompt_token_ids"]])
                new = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=llm.tok.pad_token_id)[0, ids.shape[1]:].tolist()
                eos = llm.tok.eos_token_id
                new = new[:new.index(eos)] if eos in new else new
                out.append((llm.tok.decode(new, skip_special_tokens=True), len(new), False))
        return out

    monkeypatch.setattr(S, "vllm_engine", Engine)
    monkeypatch.setattr(S, "_lora_request", lambda path, ids: path)
    monkeypatch.setattr(S, "generate_vllm", generate)
    model_dir = models.config_dir(tmp_path, None)
    ok, detail = gpucheck.vllm_vs_hf(model_dir, tmp_path, "cpu", n_tokens=4)
    assert ok, detail
    assert "base 4/4, rank1 4/4, r32 4/4" in detail

    def one_off(llm, prompts, loras, **kw):
        got = generate(llm, prompts, loras, **kw)
        return [(t + "!", n, tr) for t, n, tr in got[:1]] + got[1:] if loras[0] and "r32" in str(loras[0]) else got

    monkeypatch.setattr(S, "generate_vllm", one_off)
    ok, detail = gpucheck.vllm_vs_hf(model_dir, tmp_path / "again", "cpu", n_tokens=4)
    assert not ok and "r32 3/4" in detail and "rank1 4/4" in detail
