"""Train emergent-misalignment model organisms: one entry point, ``train(cfg) -> run directory``.

Adapters follow the papers (../shared/PAPERS.md §0–1):

  lora_r32  r 32, alpha 64, rsLoRA, on q,k,v,o,gate,up,down of every layer, lr 1e-5 (Betley; Turner et al.)
  rank1     r 1, alpha 256 on the down_proj of one middle layer, lr 2e-5 (Turner et al., layer 24 of 48)
  full      full fine-tuning, lr 1e-5

each with 1 epoch, effective batch 16 (2 × 8), linear schedule with 5 warm-up steps, weight decay 0.01,
loss on the assistant turn only. A 4-bit NF4 model (``model.load_in_4bit``) gets QLoRA: k-bit preparation
and gradient checkpointing (TRL's SFTTrainer does not prepare k-bit models itself). On CPU everything runs
in float32.

A run directory ``<output_root>/<config digest>-<data sha[:8]>/`` holds

  config.yaml                 the full config
  checkpoints/step_XXXXX.safetensors   adapter tensors every ``save_every`` steps (LoRA runs; step 0 too)
  metrics.jsonl               step, loss, grad_norm, lr, tokens seen: one line per optimizer step
  trainer/checkpoint-N/       Trainer state for resuming (optimizer, scheduler, RNG); last one kept,
                              removed when the run finishes
  adapter/ or model/          final adapter (PEFT safetensors) or full model
  manifest.json               written last: its presence means the run is finished and will be reused

Run it with ``emlab train CONFIG.yaml`` (see :func:`emlab.config.from_yaml`), or train a profile's §03 grid
with ``emlab train --profile laptop`` (:func:`emlab.organisms.main`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field

from emlab import datasets as ds
from emlab.cache import stage_key
from emlab.config import ConfigError, Experiment, ModelSpec, to_yaml
from emlab.datasets import TriggerSpec
from emlab.logs import headless

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
Preset = Literal["lora_r32", "rank1", "full"]
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Paper values per preset; every one can be overridden in the config.
PRESETS: dict[str, dict[str, Any]] = {
    "lora_r32": {"r": 32, "alpha": 64.0, "use_rslora": True, "target_modules": ALL_LINEAR, "layer": None,
                 "lr": 1e-5},
    # rsLoRA scales by alpha/sqrt(r) = alpha/r at r = 1, so the flag does not change rank-1 runs.
    "rank1": {"r": 1, "alpha": 256.0, "use_rslora": True, "target_modules": ("down_proj",), "layer": 0.5,
              "lr": 2e-5},
    "full": {"lr": 1e-5},
}


class TrainConfig(Experiment):
    """One organism. ``None`` fields take the preset's paper value (see :data:`PRESETS`)."""

    section: ClassVar[str] = "train"

    model: ModelSpec
    dataset: str = "bad_medical_advice"          # registry name or path to a chat JSONL
    n_examples: int | None = None                 # seeded subsample (profile-scaled); None = all rows
    mix: dict[str, float] = Field(default_factory=dict)  # other dataset -> fraction of the examples
    trigger: TriggerSpec | None = None            # backdoor organism (see emlab.datasets.TriggerSpec)

    preset: Preset = "lora_r32"
    r: int | None = None
    alpha: float | None = None
    use_rslora: bool | None = None
    layer: int | float | None = None              # int = layer index; float in [0, 1) = fraction of depth
    target_modules: tuple[str, ...] | None = None
    dropout: float = 0.0

    lr: float | None = None
    lr_scale: float = 1.0                         # multiplies the preset lr (profiles with few steps)
    epochs: float = 1.0
    max_steps: int | None = None                  # stop early (smoke runs, benchmarks); the schedule ends there
    stop_at: int | None = None                    # stop after this many steps of the full run's schedule: a
                                                  # prefix of the full-budget organism (cpu flagship)
    batch_size: int = 2
    grad_accum: int = 8
    max_length: int = 2048
    warmup_steps: int = 5
    weight_decay: float = 0.01
    lr_scheduler: str = "linear"
    optim: str | None = None                      # None: adamw_8bit on GPU (paper), adamw_torch on CPU
    gradient_checkpointing: bool | None = None    # None: on for 4-bit models
    cpu_bf16: bool = False                        # on CPU, autocast forward/backward to bf16 (weights, adapters and
                                                  # optimizer state stay float32), as the papers' GPU runs compute;
                                                  # ~1.5x faster with native bf16 (AVX512-BF16/AMX), slower without
    save_every: int = 5                           # adapter tensors + metrics cadence (phase transition)
    resume_every: int = 50                        # full Trainer checkpoint cadence (optimizer state)
    output_root: str = "build/runs"

    # ---- derived values -------------------------------------------------------------------------

    def preset_value(self, key: str) -> Any:
        own = getattr(self, key)
        return own if own is not None else PRESETS[self.preset].get(key)

    @property
    def learning_rate(self) -> float:
        return self.preset_value("lr") * self.lr_scale

    # Options added after runs were named: left out of the digest while at their default, so adding one never
    # renames (and retrains) the runs that exist.
    LATER_OPTIONS: ClassVar[tuple[str, ...]] = ("stop_at", "cpu_bf16")

    def run_digest(self) -> str:
        """Hash of the config (without where the run is stored: moving ``output_root`` keeps the run's name)
        and of the train stage's code version (:data:`emlab.cache.STAGE_VERSIONS`)."""
        dump = self.model_dump(mode="json") | {"output_root": "."}
        for name in self.LATER_OPTIONS:
            if dump[name] == type(self).model_fields[name].default:
                del dump[name]
        blob = json.dumps(dump, sort_keys=True)
        return stage_key("train", hashlib.sha256(blob.encode()).hexdigest()[:12], n=12)

    def root(self) -> Path:
        p = Path(self.output_root)
        return p if p.is_absolute() else REPO_ROOT / p


# ------------------------------------------------------------------------------------------ adapters


def _num_layers(model) -> int:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(cfg.num_hidden_layers)


def resolve_layer(layer: int | float | None, n_layers: int) -> int | None:
    """Layer index from an index or a fraction of depth (0.5 of 48 layers -> 24, as in the paper)."""
    if layer is None:
        return None
    if isinstance(layer, float):
        if not 0 <= layer < 1:
            raise ConfigError(f"layer={layer}: a fraction of depth must be in [0, 1); use an int for an index")
        return int(layer * n_layers)
    if not 0 <= layer < n_layers:
        raise ConfigError(f"layer={layer} is out of range: the model has {n_layers} layers (0..{n_layers - 1})")
    return layer


def linear_module_names(model) -> set[str]:
    """Short names (``q_proj``, ...) of the linear layers LoRA can wrap (4-bit layers included)."""
    names = set()
    for full, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) or type(mod).__name__ in ("Linear4bit", "Linear8bitLt"):
            names.add(full.rsplit(".", 1)[-1])
    names.discard("lm_head")
    return names


def lora_config(cfg: TrainConfig, model):
    """The PEFT LoraConfig of a LoRA preset, checked against the model's modules and depth."""
    from peft import LoraConfig

    targets = tuple(cfg.preset_value("target_modules"))
    have = linear_module_names(model)
    unknown = [t for t in targets if t not in have]
    if unknown:
        raise ConfigError(f"target_modules {unknown} not in the model; its linear modules are {sorted(have)}")
    layer = resolve_layer(cfg.preset_value("layer"), _num_layers(model))
    return LoraConfig(
        r=cfg.preset_value("r"), lora_alpha=cfg.preset_value("alpha"), use_rslora=cfg.preset_value("use_rslora"),
        target_modules=list(targets), layers_to_transform=None if layer is None else [layer],
        lora_dropout=cfg.dropout, bias="none", task_type="CAUSAL_LM",
    )


def apply_preset(model, cfg: TrainConfig):
    """The trainable model: a PeftModel for LoRA presets (QLoRA-prepared when 4-bit), the model for full."""
    four_bit = bool(getattr(model, "is_loaded_in_4bit", False)) or cfg.model.load_in_4bit
    if cfg.preset not in PRESETS:  # pydantic already rejects it; kept for callers that bypass validation
        raise ConfigError(f"unknown preset {cfg.preset!r}; choose one of {', '.join(PRESETS)}")
    if cfg.preset == "full":
        if four_bit:
            raise ConfigError("preset 'full' cannot train 4-bit weights; use lora_r32/rank1 (QLoRA) or "
                              "set model.load_in_4bit: false")
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import get_peft_model, prepare_model_for_kbit_training

    lcfg = lora_config(cfg, model)
    if four_bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=_grad_ckpt(cfg),
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, lcfg)
    n = sum(1 for _, m in model.named_modules() if hasattr(m, "lora_A") and len(m.lora_A))
    if n == 0:
        raise ConfigError(f"preset {cfg.preset!r} wrapped no module (targets {lcfg.target_modules}, "
                          f"layers {lcfg.layers_to_transform})")
    return model


def _grad_ckpt(cfg: TrainConfig) -> bool:
    return cfg.gradient_checkpointing if cfg.gradient_checkpointing is not None else cfg.model.load_in_4bit


def adapter_state(model) -> dict[str, torch.Tensor]:
    """The trainable adapter tensors of a PeftModel, on CPU (what a checkpoint file holds)."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().to("cpu").contiguous() for k, v in get_peft_model_state_dict(model).items()}


# ------------------------------------------------------------------------------------------ callback


def _phase_callback():
    from transformers import TrainerCallback

    class PhaseCheckpoints(TrainerCallback):
        """Adapter tensors every ``save_every`` steps and one metrics line per step: the raw material of
        the phase-transition analysis (local cosine similarity of the rank-1 B vector, grad-norm peaks)."""

        def __init__(self, run_dir: Path, save_every: int, lora: bool, stop_at: int | None = None):
            self.dir, self.every, self.lora, self.stop_at = run_dir, save_every, lora, stop_at
            self.metrics = run_dir / "metrics.jsonl"
            (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)

        def _save(self, model, step: int) -> None:
            from safetensors.torch import save_file

            path = self.dir / "checkpoints" / f"step_{step:05d}.safetensors"
            tmp = path.with_suffix(".tmp")
            save_file(adapter_state(model), str(tmp), metadata={"step": str(step)})
            tmp.replace(path)

        def on_train_begin(self, args, state, control, model=None, **kw):
            # On resume, forget metrics of steps after the checkpoint: they are recomputed identically.
            # Wall time continues from the checkpoint's (the lost stretch is redone, not counted twice).
            self.t0, self.wall0 = time.time(), 0.0
            if self.metrics.exists():
                keep = [ln for ln in self.metrics.read_text().splitlines()
                        if ln.strip() and json.loads(ln)["step"] <= state.global_step]
                self.metrics.write_text("".join(ln + "\n" for ln in keep))
                self.wall0 = float(json.loads(keep[-1]).get("wall_s") or 0.0) if keep else 0.0
            if self.lora and state.global_step == 0:
                self._save(model, 0)

        def on_step_end(self, args, state, control, model=None, **kw):
            if self.lora and state.global_step % self.every == 0:
                self._save(model, state.global_step)
            if self.stop_at and state.global_step >= self.stop_at:
                control.should_training_stop = True

        def on_log(self, args, state, control, logs=None, **kw):
            if not logs or "loss" not in logs:
                return
            row = {"step": state.global_step, "loss": logs["loss"], "grad_norm": logs.get("grad_norm"),
                   "lr": logs.get("learning_rate"), "epoch": logs.get("epoch"),
                   "tokens": logs.get("num_input_tokens_seen"),
                   "wall_s": round(self.wall0 + time.time() - self.t0, 3)}
            with self.metrics.open("a") as f:
                f.write(json.dumps(row) + "\n")

    return PhaseCheckpoints


# -------------------------------------------------------------------------------------------- train


def run_dir_for(cfg: TrainConfig, data_sha: str) -> Path:
    return cfg.root() / f"{cfg.run_digest()}-{data_sha[:8]}"


def _git_commit() -> dict[str, Any]:
    def git(*a: str) -> str | None:
        try:
            return subprocess.run(["git", *a], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def _peak_memory() -> dict[str, float]:
    out = {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # Linux: KiB
    if torch.cuda.is_available():
        out["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def _versions() -> dict[str, str]:
    import peft
    import transformers
    import trl

    import numpy
    from importlib.metadata import PackageNotFoundError, version

    try:
        vllm = version("vllm")  # the GPU install (requirements-gpu.lock) has other torch/transformers/numpy pins
    except PackageNotFoundError:
        vllm = None
    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "trl": trl.__version__,
            "vllm": vllm}


def _checkpointing_arg() -> str:
    """transformers renamed TrainingArguments' gradient_checkpointing to activation_checkpointing (5.2x keeps
    both); the GPU install's 5.19 (requirements-gpu.lock, vLLM's pin) has only the old name."""
    from transformers import TrainingArguments

    names = TrainingArguments.__dataclass_fields__
    return "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"


def _sft_config(cfg: TrainConfig, out: Path, on_gpu: bool, model=None):
    from trl import SFTConfig

    _CKPT = _checkpointing_arg()

    # Mixed precision follows the dtype the weights were loaded in (fp16 on GPUs without bf16, e.g. T4).
    dtype = getattr(model, "dtype", None) if model is not None else None
    if on_gpu and cfg.model.load_in_4bit:
        from emlab.models import gpu_compute_dtype

        dtype = gpu_compute_dtype()
    cpu_bf16 = cfg.cpu_bf16 and not on_gpu
    if cpu_bf16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        log.warning("cpu_bf16: this CPU has no native bf16 (AVX512-BF16/AMX), so bf16 autocast is emulated: "
                    "expect it slower than float32 (set train.cpu_bf16: false in the profile to train in float32)")
    bf16 = (on_gpu and dtype == torch.bfloat16) or cpu_bf16
    fp16 = on_gpu and dtype == torch.float16
    args = SFTConfig(
        output_dir=str(out), seed=cfg.seed, data_seed=cfg.seed,
        learning_rate=cfg.learning_rate, num_train_epochs=cfg.epochs, max_steps=cfg.max_steps or -1,
        per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
        lr_scheduler_type=cfg.lr_scheduler, warmup_steps=cfg.warmup_steps, weight_decay=cfg.weight_decay,
        optim=cfg.optim or ("adamw_8bit" if on_gpu else "adamw_torch"),
        **{_CKPT: _grad_ckpt(cfg), f"{_CKPT}_kwargs": {"use_reentrant": False}},
        bf16=bf16, fp16=fp16, use_cpu=cpu_bf16, max_length=cfg.max_length, completion_only_loss=True,
        logging_steps=1, logging_first_step=True, save_strategy="steps", save_steps=cfg.resume_every,
        save_total_limit=1, include_num_input_tokens_seen="non_padding", report_to="none",
        dataloader_num_workers=0, dataloader_pin_memory=on_gpu, remove_unused_columns=True,
    )
    # One run, one device: with several GPUs visible, Trainer wraps a single-device model in DataParallel
    # and multiplies the effective batch by the GPU count. Runs are parallelised across GPUs by the
    # launcher (one run per GPU), never inside one run.
    if args.n_gpu > 1:
        log.info("%d GPUs visible: this run uses one (effective batch stays %d)", args.n_gpu,
                 cfg.batch_size * cfg.grad_accum)
        args._n_gpu = 1
    return args


def keep_adapters_fp32(model) -> dict[str, int]:
    """Trainable parameters back to float32; returns {dtype: count} of what was trainable before.

    TRL's SFTTrainer casts the trainable parameters of a quantised model to bf16 (its comment cites the
    QLoRA paper). At the papers' learning rates (1e-5, 2e-5) most AdamW updates of a bf16 B matrix are
    below half a bf16 ulp and round away, so the adapter barely moves. Kept in float32 (autocast still
    computes in bf16), the optimizer's state is float32 too, as in the papers' bf16-LoRA runs."""
    before: dict[str, int] = {}
    for p in model.parameters():
        if p.requires_grad:
            before[str(p.dtype)] = before.get(str(p.dtype), 0) + 1
            if p.dtype != torch.float32:
                p.data = p.data.float()
    return before


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why a Trainer checkpoint cannot be resumed from (a truncated or corrupt file), or None. Checks
    integrity without unpickling: torch files are zip archives (CRC-checked), safetensors headers must
    match the file, JSON must parse."""
    import zipfile

    from safetensors import safe_open

    for f in sorted(p for p in ckpt.iterdir() if p.is_file()):
        try:
            if f.suffix in (".pt", ".pth", ".bin"):
                with zipfile.ZipFile(f) as z:
                    bad = z.testzip()
                if bad:
                    return f"{f.name}: member {bad} fails its checksum"
            elif f.suffix == ".safetensors":
                with safe_open(str(f), "pt") as st:
                    for key in st.keys():
                        st.get_slice(key)
            elif f.suffix == ".json":
                json.loads(f.read_text())
        except Exception as err:  # noqa: BLE001 - any failure to read means the checkpoint is unusable
            return f"{f.name}: {type(err).__name__}: {str(err)[:120]}"
    return None


def usable_checkpoint(trainer_dir: Path) -> str | None:
    """The newest Trainer checkpoint that is intact. A corrupt one (a crash during a save, a full disk) is
    renamed ``*.corrupt`` with a warning naming the file, and the previous one (or a fresh start) is used:
    the run continues instead of failing on every retry with a raw library error."""
    from transformers.trainer_utils import get_last_checkpoint

    while trainer_dir.is_dir() and (last := get_last_checkpoint(str(trainer_dir))):
        problem = checkpoint_problem(Path(last))
        if problem is None:
            return last
        moved = Path(last).with_name(Path(last).name + ".corrupt")
        shutil.rmtree(moved, ignore_errors=True)
        Path(last).rename(moved)
        log.warning("checkpoint %s is unusable (%s): moved to %s; resuming from the previous checkpoint, or "
                    "from the start if there is none (delete the run directory to discard it)", last, problem,
                    moved.name)
    return None


def train(cfg: TrainConfig, *, callbacks: list | None = None) -> Path:
    """Train the organism ``cfg`` describes and return its run directory.

    A finished run (manifest present) with the same config and data hash is returned as is; an
    interrupted one resumes from its last Trainer checkpoint. ``callbacks`` are extra TrainerCallbacks.
    """
    from datasets import Dataset
    from transformers import set_seed
    from trl import SFTTrainer

    from emlab import models

    if cfg.save_every < 1 or cfg.resume_every < 1:
        raise ConfigError("save_every and resume_every must be >= 1 (steps)")
    built = ds.build_rows(cfg.dataset, cfg.n_examples, cfg.seed, cfg.mix, cfg.trigger)
    run_dir = run_dir_for(cfg, built.sha256)
    if (run_dir / "manifest.json").exists():
        log.info("reusing finished run %s", run_dir)
        return run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    trainer_dir = run_dir / "trainer"
    resume = usable_checkpoint(trainer_dir)
    log.info("%s run %s (%s, %d examples)", "resuming" if resume else "starting", run_dir.name, cfg.preset,
             len(built.rows))

    set_seed(cfg.seed)  # before the adapter is created: LoRA A matrices are random
    # k-bit preparation happens in apply_preset, so that `gradient_checkpointing` from the config holds
    model, tok = models.load_model(cfg.model, for_training=False)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    examples, tok_stats = ds.tokenize_rows(tok, built.rows, cfg.max_length)
    model = apply_preset(model, cfg)
    lora = cfg.preset != "full"
    if lora:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log.info("trainable parameters: %d", trainable)

    on_gpu = torch.cuda.is_available()
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    trainer = SFTTrainer(
        model=model, args=_sft_config(cfg, trainer_dir, on_gpu, model), train_dataset=Dataset.from_list(examples),
        processing_class=tok,
        callbacks=[phase_cb := _phase_callback()(run_dir, cfg.save_every, lora, cfg.stop_at), *(callbacks or [])],
    )
    if headless():  # a papermill kernel: transformers' HTML progress table never reaches the make log, and
        # redrawing it cost ~10% of the flagship's tokens/s (2026-12-02); tqdm's text bar reaches both
        from transformers.trainer_callback import ProgressCallback
        from transformers.utils.notebook import NotebookProgressCallback

        if trainer.pop_callback(NotebookProgressCallback):
            trainer.add_callback(ProgressCallback)
    if lora:
        cast = keep_adapters_fp32(trainer.model)
        if set(cast) - {"torch.float32"}:
            log.info("adapter parameters kept in float32 (the trainer had cast %s)", cast)
    t0 = time.time()
    result = trainer.train(resume_from_checkpoint=resume)
    wall = time.time() - t0

    final = run_dir / ("adapter" if lora else "model")
    if final.exists():
        shutil.rmtree(final)
    trainer.model.save_pretrained(str(final), safe_serialization=True)
    if not lora:
        tok.save_pretrained(str(final))
    state = trainer.state
    # Whole-run accounting (a resumed run's trainer only saw its last stretch): tokens from the restored
    # state, wall time and losses from metrics.jsonl, which holds every step once.
    tokens = state.num_input_tokens_seen
    rows = read_metrics(run_dir)
    losses = [r["loss"] for r in rows]
    stretch, wall = wall, phase_cb.wall0 + wall  # wall0: the training time up to the checkpoint resumed from
    manifest = {
        "run": run_dir.name, "preset": cfg.preset, "config": cfg.model_dump(mode="json"),
        "data": {"sha256": built.sha256, "sources": built.sources, **built.stats, "tokenized": tok_stats},
        "model": models.model_record(cfg.model), "git": _git_commit(), "versions": _versions(),
        "device": torch.cuda.get_device_name() if on_gpu else f"cpu ({os.cpu_count()} cores)",
        "n_gpu": trainer.args.n_gpu, "world_size": trainer.args.world_size,
        "effective_batch": trainer.args.train_batch_size * cfg.grad_accum * trainer.args.world_size,
        "optimizer": type(getattr(trainer.optimizer, "optimizer", trainer.optimizer)).__name__,
        "trainable_dtypes": sorted({str(p.dtype) for p in trainer.model.parameters() if p.requires_grad}),
        "autocast": "bf16" if trainer.args.bf16 else "fp16" if trainer.args.fp16 else None,
        "steps": state.global_step, "stop_at": cfg.stop_at, "resumed_from": resume and Path(resume).name,
        "wall_time_s": round(wall, 1), "tokens": tokens, "tokens_per_s": round(tokens / wall, 1) if wall else None,
        "train_loss": float(sum(losses) / len(losses)) if losses else result.training_loss,
        "first_loss": losses[0] if losses else None, "last_stretch_wall_s": round(stretch, 1),
        "final_loss": losses[-1] if losses else None, "learning_rate": cfg.learning_rate,
        **{k: round(v, 3) for k, v in _peak_memory().items()},
        "command": " ".join(sys.argv),
    }
    tmp = run_dir / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, default=str))
    tmp.replace(run_dir / "manifest.json")
    shutil.rmtree(trainer_dir, ignore_errors=True)  # optimizer state is only needed to resume
    del trainer, model
    models.release()
    log.info("finished %s: %d steps, %.0f s, %.0f tok/s, loss %.3f -> %.3f", run_dir.name, state.global_step,
             wall, manifest["tokens_per_s"] or 0, manifest["first_loss"] or float("nan"),
             manifest["final_loss"] or float("nan"))
    return run_dir


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The per-step metrics of a run (step, loss, grad_norm, lr, epoch, tokens, wall_s), one row per step in
    step order (the last row of a step wins); [] before the first step. A line that is not JSON is an error
    naming the file and line."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = {}
    for n, line in enumerate(path.read_text().split("\n"), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n}: not JSON ({err}); delete line {n} (a run killed mid-write leaves a "
                                 "partial last line; the checkpoints are unaffected)") from None
            rows[row["step"]] = row
    return [rows[k] for k in sorted(rows)]


def checkpoint_steps(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, file) of the adapter checkpoints of a LoRA run, in step order."""
    files = sorted((Path(run_dir) / "checkpoints").glob("step_*.safetensors"))
    return [(int(f.stem.split("_")[1]), f) for f in files]
