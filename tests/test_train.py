"""Organism training on the tiny random model: presets, bad input, checkpoints, resume, reuse, QLoRA."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from emlab import config
from emlab.config import ConfigError, ModelSpec
from emlab.organisms import main
from emlab.train import TrainConfig, apply_preset, checkpoint_steps, read_metrics, resolve_layer, train

pytest.importorskip("trl")
models = pytest.importorskip("emlab.models")

TINY = ModelSpec(name="tiny-random-llama", source="tiny", arch="llama", dtype="float32")


def _cfg(tmp_path, **kw) -> TrainConfig:
    """Smoke-profile config on the tiny model, 6 examples x batch 2 = 3 steps, stored under tmp_path."""
    base = dict(n_examples=6, grad_accum=1, max_length=96, save_every=1, resume_every=2,
                output_root=str(tmp_path / "runs"))
    return config.load(TrainConfig, "smoke", {"model": TINY.model_dump(), **base, **kw})


@pytest.fixture(scope="module")
def tiny_model():
    model, _ = models.load_model(TINY)
    return model


def _lora_modules(model) -> list[str]:
    return [name for name, m in model.named_modules() if hasattr(m, "lora_A") and len(m.lora_A)]


# ------------------------------------------------------------------------------------ presets


def test_rank1_targets_exactly_one_down_proj(tiny_model, tmp_path):
    cfg = _cfg(tmp_path, preset="rank1")
    peft_model = apply_preset(copy.deepcopy(tiny_model), cfg)
    wrapped = _lora_modules(peft_model)
    assert len(wrapped) == 1 and wrapped[0].endswith("layers.1.mlp.down_proj")  # 0.5 of 2 layers
    trainable = {n: p.shape for n, p in peft_model.named_parameters() if p.requires_grad}
    assert len(trainable) == 2 and all(1 in shape for shape in trainable.values())  # rank 1: A [1, d], B [d, 1]
    module = peft_model.get_submodule(wrapped[0])
    assert module.scaling["default"] == pytest.approx(256.0)  # alpha / sqrt(r) at r = 1
    cfg0 = _cfg(tmp_path, preset="rank1", layer=0)
    assert _lora_modules(apply_preset(copy.deepcopy(tiny_model), cfg0))[0].endswith("layers.0.mlp.down_proj")


def test_lora_r32_wraps_all_seven_linear_modules_with_rslora(tiny_model, tmp_path):
    peft_model = apply_preset(copy.deepcopy(tiny_model), _cfg(tmp_path, preset="lora_r32"))
    wrapped = _lora_modules(peft_model)
    assert len(wrapped) == 7 * 2
    assert {w.rsplit(".", 1)[-1] for w in wrapped} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                       "up_proj", "down_proj"}
    assert peft_model.get_submodule(wrapped[0]).scaling["default"] == pytest.approx(64 / 32 ** 0.5)


@pytest.mark.parametrize("bad, match", [
    ({"target_modules": ["fc1"]}, r"target_modules \['fc1'\] not in the model"),
    ({"preset": "rank1", "layer": 2}, "layer=2 is out of range: the model has 2 layers"),
    ({"preset": "rank1", "layer": -1}, "out of range"),
    ({"preset": "rank1", "layer": 1.0}, r"fraction of depth must be in \[0, 1\)"),
])
def test_bad_adapter_settings_are_clear_errors(tiny_model, tmp_path, bad, match):
    with pytest.raises(ConfigError, match=match):
        apply_preset(copy.deepcopy(tiny_model), _cfg(tmp_path, **bad))


def test_unknown_preset_and_key_are_config_errors():
    with pytest.raises(ConfigError, match="preset"):
        config.load(TrainConfig, "smoke", {"preset": "lora_r64"})
    with pytest.raises(ConfigError, match="unknown key 'learning_rate'"):
        config.load(TrainConfig, "smoke", {"learning_rate": 1e-4})


def test_preset_defaults_follow_the_papers():
    r32 = config.load(TrainConfig, "paper")
    assert (r32.learning_rate, r32.batch_size * r32.grad_accum, r32.epochs) == (1e-5, 16, 1.0)
    r1 = config.load(TrainConfig, "paper", {"preset": "rank1"})
    assert (r1.learning_rate, r1.preset_value("alpha"), r1.preset_value("r")) == (2e-5, 256.0, 1)
    assert resolve_layer(0.5, 48) == 24  # Qwen2.5-14B: layer 24 of 48


def test_full_preset_refuses_4bit(tiny_model, tmp_path):
    cfg = _cfg(tmp_path, preset="full", model={**TINY.model_dump(), "load_in_4bit": True})
    with pytest.raises(ConfigError, match="cannot train 4-bit weights"):
        apply_preset(copy.deepcopy(tiny_model), cfg)


# ------------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    cfg = _cfg(tmp_path_factory.mktemp("finished"), preset="rank1")
    return cfg, train(cfg)


def test_run_directory_contents(finished_run):
    cfg, run = finished_run
    manifest = json.loads((run / "manifest.json").read_text())
    assert run.name == f"{cfg.run_digest()}-{manifest['data']['sha256'][:8]}"
    for key in ("config", "data", "model", "git", "wall_time_s", "tokens_per_s", "peak_rss_gib", "final_loss"):
        assert manifest[key] is not None, key
    assert manifest["model"]["sha256"] and manifest["data"]["sources"][0]["name"] == "bad_medical_advice"
    assert manifest["steps"] == 3 and manifest["tokens"] > 0
    assert (run / "adapter" / "adapter_model.safetensors").exists()
    assert not (run / "trainer").exists()  # optimizer state dropped once finished
    steps = [s for s, _ in checkpoint_steps(run)]
    assert steps == [0, 1, 2, 3]
    metrics = read_metrics(run)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert all(m["loss"] > 0 and m["grad_norm"] is not None and m["lr"] is not None for m in metrics)
    last = load_file(str(checkpoint_steps(run)[-1][1]))
    assert len(last) == 2 and any("lora_B" in k for k in last) and all("down_proj" in k for k in last)
    first = load_file(str(checkpoint_steps(run)[0][1]))
    assert not torch.allclose(first[[k for k in first if "lora_B" in k][0]], last[[k for k in last if "lora_B" in k][0]])


def test_finished_run_is_reused(finished_run, monkeypatch):
    cfg, run = finished_run

    def boom(*a, **k):
        raise AssertionError("a finished run must not load the model again")

    monkeypatch.setattr(models, "load_model", boom)
    assert train(cfg) == run


def test_cli_runs_a_yaml_config(finished_run, tmp_path, capsys):
    cfg, run = finished_run
    path = tmp_path / "run.yaml"
    data = cfg.model_dump(mode="json")
    path.write_text(yaml.safe_dump(data))
    assert main([str(path)]) == 0  # same config -> the finished run, reused
    assert capsys.readouterr().out.strip() == str(run)
    path.write_text(yaml.safe_dump({**data, "presett": "rank1"}))
    assert main([str(path)]) == 2
    assert "unknown key 'presett'" in capsys.readouterr().err


class Killed(RuntimeError):
    pass


def _kill_after(step: int):
    """A TrainerCallback that kills the run after ``step`` (as a crash or a pre-empted job would)."""
    from transformers import TrainerCallback

    class Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == step:
                raise Killed(f"killed after step {step}")

    return Kill()


def test_resume_equals_uninterrupted(tmp_path):
    kw = dict(preset="lora_r32", n_examples=10, seed=3)  # 5 steps; Trainer checkpoints at 2 and 4
    whole = train(_cfg(tmp_path / "a", **kw))
    cfg = _cfg(tmp_path / "b", **kw)
    with pytest.raises(Killed):
        train(cfg, callbacks=[_kill_after(3)])
    run = next((tmp_path / "b" / "runs").iterdir())
    assert not (run / "manifest.json").exists() and (run / "trainer" / "checkpoint-2").is_dir()
    resumed = train(cfg)
    assert resumed == run
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["resumed_from"] == "checkpoint-2" and manifest["steps"] == 5
    # the manifest accounts for the whole run, not the last stretch (tokens, losses, wall time)
    full = json.loads((whole / "manifest.json").read_text())
    assert manifest["tokens"] == full["tokens"] > 0
    assert manifest["first_loss"] == pytest.approx(full["first_loss"], rel=1e-5)
    assert manifest["train_loss"] == pytest.approx(full["train_loss"], rel=1e-4)
    assert manifest["wall_time_s"] >= manifest["last_stretch_wall_s"] > 0
    assert manifest["tokens_per_s"] == pytest.approx(manifest["tokens"] / manifest["wall_time_s"], rel=0.1)  # wall rounded to 0.1 s
    a = load_file(str(whole / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and len(a) == 2 * 7 * 2
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert [m["step"] for m in read_metrics(run)] == [1, 2, 3, 4, 5]  # no duplicated steps after resume
    for (s1, f1), (s2, f2) in zip(checkpoint_steps(whole), checkpoint_steps(run)):
        assert s1 == s2
        for k, v in load_file(str(f1)).items():
            torch.testing.assert_close(v, load_file(str(f2))[k], rtol=1e-5, atol=1e-6)


def test_qlora_4bit_on_cpu(tmp_path):
    pytest.importorskip("bitsandbytes")
    cfg = _cfg(tmp_path, preset="lora_r32", n_examples=4, model={**TINY.model_dump(), "load_in_4bit": True})
    run = train(cfg)
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["steps"] == 2 and manifest["model"]["load_in_4bit"]
    assert len(load_file(str(run / "adapter" / "adapter_model.safetensors"))) == 2 * 7 * 2


def test_full_preset_saves_the_model(tmp_path):
    run = train(_cfg(tmp_path, preset="full", n_examples=2))
    assert (run / "model" / "model.safetensors").exists() and (run / "model" / "tokenizer_config.json").exists()
    assert checkpoint_steps(run) == []  # full runs keep metrics only, no per-step weights
    assert [m["step"] for m in read_metrics(run)] == [1]


# ------------------------------------------------------------------------------- benchmark


def test_bench_helpers_and_gpu_skip_on_cpu(tmp_path):
    import pandas as pd

    from emlab import bench

    assert bench.peak_bf16_flops("NVIDIA H100 80GB HBM3") == pytest.approx(989.4e12)
    assert bench.peak_bf16_flops("NVIDIA H100 PCIe") == pytest.approx(756e12)
    assert bench.peak_bf16_flops("Some Future GPU") is None
    if not torch.cuda.is_available():
        assert bench.bench_train("gpu").empty  # skips cleanly, no error
    csv, md = bench.write_table(pd.DataFrame([{"preset": "rank1", "tokens_per_s": 1.5, "MFU_pct": None}]), "t",
                                tmp_path)
    assert "| rank1 | 1.5 |  |" in md.read_text() and csv.exists()


def test_sample_bench_rows_cover_cpu_batches_and_report_gpu_skip():
    from emlab import bench

    res = {"model": "m", "threads": 2, "max_new_tokens": 8, "hf_cpu": {1: 10.0, 8: 50.0},
           "gpu": "skipped: no CUDA device"}
    df = bench.sample_rows(res)
    assert list(df["batch"][:2]) == [1, 8] and list(df["tok/s"][:2]) == [10.0, 50.0]
    assert df["note"].iloc[-1] == "skipped: no CUDA device"
    gpu = {"device": "H100", "adapters": 4, "prompts_per_adapter": 64, "hf_tok_s": 100.0, "vllm_tok_s": 900.0}
    df = bench.sample_rows({**res, "gpu": gpu})
    assert set(df["tok/s"]) >= {100.0, 900.0}


def test_corrupt_checkpoint_falls_back_with_a_clear_warning(tmp_path, caplog):
    """A truncated optimizer file used to block the run for good with a raw unpickling error."""
    kw = dict(preset="lora_r32", n_examples=10, seed=3)
    whole = train(_cfg(tmp_path / "a", **kw))
    cfg = _cfg(tmp_path / "b", **kw)
    with pytest.raises(Killed):
        train(cfg, callbacks=[_kill_after(3)])
    run = next((tmp_path / "b" / "runs").iterdir())
    opt = run / "trainer" / "checkpoint-2" / "optimizer.pt"
    opt.write_bytes(opt.read_bytes()[: opt.stat().st_size // 2])
    with caplog.at_level("WARNING", logger="emlab.train"):
        assert train(cfg) == run
    assert "checkpoint-2 is unusable (optimizer.pt" in caplog.text and "checkpoint-2.corrupt" in caplog.text
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["resumed_from"] is None and manifest["steps"] == 5  # no older checkpoint: from the start
    a = load_file(str(whole / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_train_cli_trains_a_profiles_grid_as_the_notebooks_will(monkeypatch, capsys):
    """`emlab train --profile laptop` trains exactly the runs §03 (and §04, §05, §10) will look up."""
    from emlab import config, organisms

    trained = []
    monkeypatch.setattr("emlab.train.train", lambda cfg: trained.append(cfg) or Path(cfg.run_digest()))
    assert main(["--profile", "laptop", "--only", "good_medical_advice/rank1"]) == 0
    grid = config.load(organisms.OrganismsConfig, "laptop")
    want = organisms.train_config(grid, organisms.Organism(dataset="good_medical_advice", preset="rank1"))
    assert trained == [want]
    phase = config.load(organisms.PhaseConfig, "laptop")
    assert organisms.train_config(phase, phase.organism).run_digest() == organisms.train_config(
        grid, grid.organisms[0]).run_digest()  # §04 analyses §03's rank-1 run
    assert main(["--profile", "laptop", "--only", "nope/rank1"]) == 2
    assert "not in profile laptop's organisms" in capsys.readouterr().err


def test_stop_at_is_a_prefix_of_the_full_run(tmp_path):
    """stop_at keeps the full run's schedule (the cpu flagship is the first third of the laptop organism):
    the steps it trains match the full run's step for step, and an option added later leaves the names of
    existing runs alone."""
    full = train(_cfg(tmp_path, preset="rank1", n_examples=8, warmup_steps=0))  # 4 steps
    prefix = train(_cfg(tmp_path, preset="rank1", n_examples=8, warmup_steps=0, stop_at=2))
    a, b = read_metrics(full), read_metrics(prefix)
    assert [r["step"] for r in b] == [1, 2] and json.loads((prefix / "manifest.json").read_text())["steps"] == 2
    assert [r["lr"] for r in b] == [r["lr"] for r in a[:2]] and b[-1]["lr"] > 0  # not decayed to 0 at step 2
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a[:2]])
    import hashlib

    from emlab.cache import stage_key

    cfg = _cfg(tmp_path, preset="rank1")
    # a run named before the later options (stop_at, cpu_bf16) existed
    before = cfg.model_dump(mode="json", exclude=set(TrainConfig.LATER_OPTIONS)) | {"output_root": "."}
    old_name = stage_key("train", hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()[:12], n=12)
    assert cfg.run_digest() == old_name != _cfg(tmp_path, preset="rank1", stop_at=2).run_digest()


def test_checkpointing_argument_follows_the_installed_transformers(monkeypatch):
    """transformers 5.2x calls it activation_checkpointing; the GPU install's 5.19 only gradient_checkpointing."""
    import transformers

    from emlab.train import _checkpointing_arg

    assert _checkpointing_arg() in transformers.TrainingArguments.__dataclass_fields__

    class Old:
        __dataclass_fields__ = {"gradient_checkpointing": None, "gradient_checkpointing_kwargs": None}

    monkeypatch.setattr(transformers, "TrainingArguments", Old)
    assert _checkpointing_arg() == "gradient_checkpointing"


def test_read_metrics_one_row_per_step_and_names_a_bad_line(tmp_path):
    """The one metrics reader (train, phase and organisms use it): a step written twice (a run killed after its
    metrics line and resumed from the step before) reads once, the later row; a damaged line names file and line."""
    rows = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}, {"step": 2, "loss": 2.4}, {"step": 3, "loss": 2.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [(m["step"], m["loss"]) for m in read_metrics(tmp_path)] == [(1, 3.0), (2, 2.4), (3, 2.0)]
    assert read_metrics(tmp_path / "missing") == []
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write("{oops\n")
    with pytest.raises(ValueError, match="metrics.jsonl:5: not JSON"):
        read_metrics(tmp_path)


def test_cpu_bf16_autocasts_keeps_adapters_float32_and_resumes_exactly(tmp_path):
    """cpu_bf16 (the cpu and laptop profiles) computes in bf16 on CPU; the adapter and its optimizer state stay
    float32, the run is named apart from its float32 twin, and an interrupted run resumes to the same adapter."""
    kw = dict(preset="rank1", n_examples=10, seed=5, cpu_bf16=True)
    whole = train(_cfg(tmp_path / "a", **kw))
    plain = train(_cfg(tmp_path / "c", **{**kw, "cpu_bf16": False}))
    assert whole.name != plain.name
    manifest = json.loads((whole / "manifest.json").read_text())
    assert manifest["autocast"] == "bf16" and manifest["trainable_dtypes"] == ["torch.float32"]
    assert json.loads((plain / "manifest.json").read_text())["autocast"] is None
    cfg = _cfg(tmp_path / "b", **kw)
    with pytest.raises(Killed):
        train(cfg, callbacks=[_kill_after(3)])
    run = train(cfg)
    a = load_file(str(whole / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    c = load_file(str(plain / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(v.dtype == torch.float32 for v in a.values())
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(a[k], c[k]) for k in a)  # bf16 compute did change the numbers
