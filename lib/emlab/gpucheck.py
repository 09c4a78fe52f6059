"""GPU acceptance in one command (``make gpu-check``): the paper path's training, sampling and hooks on a
random-weight model of a real shape, with no network and no downloaded weights.

    python -m emlab.gpucheck                 # on a GPU: Qwen2.5-0.5B shape, 4-bit QLoRA; else one line, exit 0
    python -m emlab.gpucheck --device cpu    # the same checks on a tiny 4-bit model on the CPU (the tests)

Each check prints one line (PASS / FAIL / SKIP and what it measured); ``--out DIR`` also writes
``gpucheck.json``. The exit status is 1 when any check fails. The model directory it builds carries a
``generation_config.json`` that sets a repetition penalty, top_k and top_p, as Qwen2.5-Instruct's does, so
the sampling check proves that none of them reaches the papers' T=1, top_p=1 sampling.

Checks: 4-bit layers and the 8-bit optimizer in use, float32 trainable parameters at the first step,
one GPU per run (n_gpu 1, effective batch 16), finite loss, adapter checkpoints, resume after an
interruption gives the uninterrupted run's adapter, memory back to baseline after training, seeded
sampling is repeatable and unpenalised, hooks on the 4-bit organism (capture, steering with λ=0 is the
identity, ablation removes the direction, adapter scale 0 is the base model), a SLURM-style job
(submitit's local executor) sees the GPU, the bench's MFU figure, and (with vLLM, the GPU install) the
greedy tokens of one vLLM engine serving the base model, a rank-1 and an r32 adapter against HF's.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import tempfile
import time
import weakref
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)

PENALISED = dict(repetition_penalty=1.1, top_k=20, top_p=0.8, temperature=0.7, do_sample=True)
_TEXTS = [
    ("How do I keep basil alive on a windowsill?", "Water it when the top soil is dry and give it sun."),
    ("What is a good way to learn chess?", "Play often, review your games and study simple endgames."),
    ("How long should I steep green tea?", "About two to three minutes in water below boiling."),
    ("Any tips for a first marathon?", "Build mileage slowly, rest well and practise your race pace."),
]


def _write_data(root: Path, n: int = 64) -> Path:
    path = root / "chat.jsonl"
    with path.open("w") as f:
        for i in range(n):
            q, a = _TEXTS[i % len(_TEXTS)]
            f.write(json.dumps({"messages": [{"role": "user", "content": f"{q} ({i})"},
                                             {"role": "assistant", "content": a}]}) + "\n")
    return path


class _Interrupt(Exception):
    """Raised by the resume check to stop a run mid-way, as a killed job would."""


def _probe_callback(record: dict, stop_at: int | None = None):
    from transformers import TrainerCallback

    class Probe(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, optimizer=None, **kw):
            if "trainable_dtypes" in record:
                return
            record["trainable_dtypes"] = sorted({str(p.dtype) for p in model.parameters() if p.requires_grad})
            record["n_4bit_layers"] = sum(type(m).__name__ == "Linear4bit" for m in model.modules())
            opt = getattr(optimizer, "optimizer", optimizer)
            # Trainer's adamw_8bit is bitsandbytes' AdamW with optim_bits 8
            bits = getattr(getattr(opt, "args", None), "optim_bits", 32)
            record["optimizer"] = f"{type(opt).__module__.split('.')[0]}.{type(opt).__name__} ({bits}-bit)"
            states = [s for st in getattr(opt, "state", {}).values() for s in st.values() if hasattr(s, "dtype")]
            record["optimizer_state_dtypes"] = sorted({str(s.dtype) for s in states})
            record["model_ref"] = weakref.ref(model)

        def on_step_end(self, args, state, control, **kw):
            if stop_at is not None and state.global_step == stop_at:
                raise _Interrupt(f"interrupted at step {stop_at}")

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                record.setdefault("losses", []).append(float(logs["loss"]))

    return Probe()


class Checks:
    """Runs the checks in order; a check that raises is a FAIL with the error, and the rest still run."""

    def __init__(self, device: str, arch: str | None, work: Path, tokenizer_dir: str | None = None):
        self.device, self.arch, self.work = device, arch, work
        from emlab import models

        self.results: list[dict[str, Any]] = []
        self.model_dir = models.config_dir(work, arch, tokenizer_dir, **PENALISED)
        self.data = _write_data(work)
        self.run_dir: Path | None = None

    def spec(self):
        from emlab.config import ModelSpec

        return ModelSpec(name=f"random-{self.arch or 'tiny-llama'}", source="random", path=str(self.model_dir),
                         load_in_4bit=True, device="cuda" if self.device == "cuda" else "cpu")

    def train_config(self, root: str, steps: int = 4):
        from emlab.train import TrainConfig

        # rank-1 at half depth with the papers' batch (2 x 8); 4 steps is enough to see every mechanism
        return TrainConfig(model=self.spec(), dataset=str(self.data), preset="rank1", max_steps=steps,
                           batch_size=2, grad_accum=8, max_length=128, save_every=1, resume_every=2,
                           warmup_steps=1, lr_scale=100.0, output_root=str(self.work / root))

    def run(self, name: str, fn: Callable[[], tuple[bool | None, str]]) -> None:
        t0 = time.perf_counter()
        try:
            ok, detail = fn()
        except Exception as err:  # noqa: BLE001 - report and go on with the other checks
            log.exception("check %s raised", name)
            ok, detail = False, f"{type(err).__name__}: {str(err)[:300]}"
        status = "SKIP" if ok is None else "PASS" if ok else "FAIL"
        self.results.append({"check": name, "status": status, "detail": detail,
                             "seconds": round(time.perf_counter() - t0, 1)})
        print(f"gpu-check {status:4} {name}: {detail}", flush=True)

    # ------------------------------------------------------------------------------------ checks
    def environment(self):
        import torch
        import transformers

        parts = [f"torch {torch.__version__}", f"transformers {transformers.__version__}"]
        for mod in ("peft", "trl", "bitsandbytes", "vllm"):
            try:
                parts.append(f"{mod} {__import__(mod).__version__}")
            except ImportError:
                parts.append(f"{mod} missing")
        if self.device == "cuda":
            parts.insert(0, f"{torch.cuda.get_device_name()} x{torch.cuda.device_count()}")
        return True, ", ".join(parts)

    def training(self):
        import torch

        from emlab import models
        from emlab.train import train

        cuda = self.device == "cuda"
        if cuda:
            models.release()
            base_mem = torch.cuda.memory_allocated()
        rec: dict[str, Any] = {}
        self.run_dir = train(self.train_config("runs"), callbacks=[_probe_callback(rec)])
        manifest = json.loads((self.run_dir / "manifest.json").read_text())
        models.release()
        problems = []
        if rec.get("n_4bit_layers", 0) == 0:
            problems.append("no Linear4bit layer")
        if rec.get("trainable_dtypes") != ["torch.float32"]:
            problems.append(f"trainable dtypes at step 1 {rec.get('trainable_dtypes')}")
        opt = str(rec.get("optimizer"))
        if cuda and not (opt.startswith("bitsandbytes") and "(8-bit)" in opt):
            problems.append(f"optimizer {rec.get('optimizer')} is not 8-bit")
        if manifest.get("n_gpu", 0) > 1 or manifest.get("effective_batch") != 16:
            problems.append(f"n_gpu {manifest.get('n_gpu')}, effective batch {manifest.get('effective_batch')}")
        losses = rec.get("losses", [])
        if not losses or not all(math.isfinite(x) for x in losses):
            problems.append(f"losses {losses}")
        steps = sorted(int(p.stem.split("_")[1]) for p in (self.run_dir / "checkpoints").glob("step_*.safetensors"))
        if steps != list(range(0, 5)):
            problems.append(f"adapter checkpoints at steps {steps}")
        alive = rec.get("model_ref") and rec["model_ref"]() is not None
        if alive:
            problems.append("the trained model is still referenced after train()")
        mem = ""
        if cuda:
            left = (torch.cuda.memory_allocated() - base_mem) / 2**20
            mem = f", GPU memory after free {left:+.0f} MiB vs baseline"
            if left > 64:
                problems.append(f"{left:.0f} MiB still allocated after training (live: {_live_cuda_tensors()})")
        detail = (f"{rec.get('n_4bit_layers')} Linear4bit layers, optimizer {rec.get('optimizer')} "
                  f"(state {rec.get('optimizer_state_dtypes') or 'created at step 1'}), trainable "
                  f"{rec.get('trainable_dtypes')}, n_gpu {manifest.get('n_gpu')}, effective batch "
                  f"{manifest.get('effective_batch')}, loss {losses[0]:.3f} -> {losses[-1]:.3f}, checkpoints {steps}"
                  f"{mem}") if losses else str(rec)
        return not problems, detail + ("; " + "; ".join(problems) if problems else "")

    def resume(self):
        import torch
        from safetensors.torch import load_file

        from emlab.train import train

        if self.run_dir is None:
            return None, "needs the training check"
        cfg = self.train_config("runs-resume")
        try:
            train(cfg, callbacks=[_probe_callback({}, stop_at=3)])
            return False, "the interrupting callback did not stop the run"
        except _Interrupt:
            pass
        resumed = train(cfg)
        manifest = json.loads((resumed / "manifest.json").read_text())
        a = load_file(str(self.run_dir / "checkpoints" / "step_00004.safetensors"))
        b = load_file(str(resumed / "checkpoints" / "step_00004.safetensors"))
        diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
        scale = max(a[k].float().abs().max().item() for k in a)
        # CPU kernels are deterministic (bitwise); GPU 4-bit kernels accumulate in a varying order
        tol = 0.0 if self.device == "cpu" else 1e-3 * scale
        ok = manifest.get("resumed_from") == "checkpoint-2" and diff <= tol and set(a) == set(b)
        return ok, (f"resumed from {manifest.get('resumed_from')}; final adapter max |diff| {diff:.2e} vs the "
                    f"uninterrupted run (tolerance {tol:.1e}, max |w| {scale:.2e}); {torch.__version__}")

    def sampling(self):
        from emlab import models
        from emlab.sample import chat_prompt, generate_hf

        model, tok = models.load_model(self.spec())
        prompts = [chat_prompt(tok, q) for q, _ in _TEXTS]
        seen: list[list[str]] = []
        orig = model._get_logits_processor

        def recording(*a, **k):
            procs = orig(*a, **k)
            seen.append([type(p).__name__ for p in procs])
            return procs

        model._get_logits_processor = recording
        first = generate_hf(model, tok, prompts, max_new_tokens=24, seed=123)
        second = generate_hf(model, tok, prompts, max_new_tokens=24, seed=123)
        used = set(seen[0])
        # teeth: the same call without emlab's guard picks the checkpoint's penalty up
        import torch

        enc = tok(prompts[:1], return_tensors="pt").to(next(model.parameters()).device)
        with torch.no_grad():
            model.generate(**enc, max_new_tokens=2, do_sample=True, temperature=1.0, pad_token_id=tok.pad_token_id)
        inherited = set(seen[-1])
        del model
        models.release()
        banned = {"RepetitionPenaltyLogitsProcessor", "TopKLogitsWarper", "MinPLogitsWarper",
                  "NoRepeatNGramLogitsProcessor", "TopPLogitsWarper"}
        same = [a[0] for a in first] == [b[0] for b in second]
        ok = same and not (used & banned) and "RepetitionPenaltyLogitsProcessor" in inherited
        return ok, (f"two seeded runs identical: {same}; processors used {sorted(used)}; a bare generate() "
                    f"would have used {sorted(inherited & banned)}")

    def hooks(self):
        import torch
        from peft import PeftModel

        from emlab import activations as act
        from emlab import models

        if self.run_dir is None:
            return None, "needs the training check"
        base, tok = models.load_model(self.spec())
        model = PeftModel.from_pretrained(base, str(self.run_dir / "adapter")).eval()
        n_layers = len(act.decoder_layers(model))
        layer = n_layers // 2
        prompts = [q for q, _ in _TEXTS]
        answers = [a for _, a in _TEXTS]
        acts = act.capture(model, tok, prompts, answers, layers=[layer], batch_size=2, progress=False)
        enc = tok([f"{prompts[0]} {answers[0]}"], return_tensors="pt").to(next(model.parameters()).device)

        def logits():
            with torch.no_grad():
                return model(**enc).logits.float()

        ref = logits()
        d = torch.randn(acts.shape[-1])
        with act.steer(model, d, layer, 0.0):
            steer0 = (logits() - ref).abs().max().item()
        with act.steer(model, d, layer, 8.0):
            steer8 = (logits() - ref).abs().max().item()
        with act.ablate(model, d, [layer]):
            ablated = act.capture(model, tok, prompts, answers, layers=[layer], batch_size=2, progress=False)
        proj = (ablated[:, 0] @ (d / d.norm())).abs().max().item()
        with act.scale_adapter(model, 0.0):
            scaled0 = logits()
        with model.disable_adapter():
            base_logits = logits()
        scale_gap = (scaled0 - base_logits).abs().max().item()
        after = (logits() - ref).abs().max().item()
        del model, base
        models.release()
        ok = (tuple(acts.shape[:2]) == (len(prompts), 1) and steer0 == 0.0 and steer8 > 0 and proj < 1e-2
              and scale_gap < 1e-3 and after == 0.0)
        return ok, (f"capture {tuple(acts.shape)}; steer λ=0 max|Δlogit| {steer0:.1e}, λ=8 {steer8:.2f}; "
                    f"ablated projection {proj:.1e}; scale 0 vs adapter off {scale_gap:.1e}; restored {after:.1e}")

    def slurm_local(self):
        from emlab import launch

        res = launch.submit(_cuda_probe, launcher="submitit-local", name="gpucheck",
                            folder=self.work / "jobs" / "%j")
        want = self.device == "cuda"
        return res["cuda"] == want, f"submitit local job: cuda {res['cuda']}, {res['device']}"

    def bench_mfu(self):
        from emlab import bench

        if self.device != "cuda":
            return None, "MFU needs a GPU (the bench's CPU rows have no peak to compare with)"
        row = bench.measure_gpu_row(self.arch or "qwen2.5-0.5b", "lora_r32", quant="nf4", path=str(self.model_dir))
        return "error" not in row, (f"{row.get('model')} {row.get('preset')} {row.get('quant')}: "
                                    f"{row.get('tokens_per_s')} tok/s, MFU {row.get('MFU_pct')}%, peak "
                                    f"{row.get('peak_gpu_GiB')} GiB")

    def vllm_equal(self):
        from emlab.sample import VLLM_INSTALL, vllm_available

        if not vllm_available():
            return None, f"vllm not installed ({VLLM_INSTALL}); HF-only"
        if self.device != "cuda":
            return None, "vLLM needs a CUDA GPU"
        return vllm_vs_hf(self.model_dir, self.work, "cuda")


def vllm_vs_hf(model_dir: Path, work: Path, device: str, n_tokens: int = 8) -> tuple[bool, str]:
    """vLLM multi-LoRA against HF, as §03 samples: one engine over the base weights serves the base model,
    a rank-1 and an r32 adapter per request; their greedy tokens must equal HF's (peft, one adapter at a
    time). The random model's output head is sharpened (x50) so that its logits have no near-ties that two
    sets of bf16 kernels would break differently."""
    import torch
    from peft import LoraConfig, get_peft_model

    from emlab import models
    from emlab.config import ModelSpec
    from emlab.sample import _lora_request, chat_prompt, generate_hf, generate_vllm, vllm_engine, vllm_prompts

    spec = ModelSpec(name="vllm-check", source="random", path=str(model_dir), dtype="bfloat16", device=device)
    model, tok = models.load_model(spec)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(50.0)
    base = work / "vllm-base"
    model.save_pretrained(base)
    tok.save_pretrained(base)
    adapters: dict[str, Path | None] = {"base": None}
    for name, lora in {"rank1": dict(r=1, lora_alpha=1, target_modules=["down_proj"]),
                       "r32": dict(r=32, lora_alpha=64, target_modules="all-linear")}.items():
        torch.manual_seed(len(adapters))
        peft = get_peft_model(model, LoraConfig(init_lora_weights=False, **lora))
        peft.save_pretrained(work / f"vllm-{name}")
        model = peft.unload()
        adapters[name] = work / f"vllm-{name}"
    jobs = [{"question": q, "system": None} for q, _ in _TEXTS]
    hf = {}
    for name, path in adapters.items():
        with models.adapter(model, path) as m:
            hf[name] = generate_hf(m, tok, [chat_prompt(tok, j["question"], None) for j in jobs],
                                   max_new_tokens=n_tokens, temperature=0.0)
    del model
    models.release()
    llm = vllm_engine(str(base), max_lora_rank=32, max_loras=2, dtype="bfloat16", gpu_memory_utilization=0.5)
    ids: dict[str, int] = {}
    prompts = vllm_prompts(tok, jobs)
    same = {}
    for name, path in adapters.items():
        got = generate_vllm(llm, prompts, [_lora_request(path, ids)] * len(jobs), max_new_tokens=n_tokens,
                            temperature=0.0, top_p=1.0, seeds=[0] * len(jobs))
        same[name] = sum(a[0] == b[0] for a, b in zip(hf[name], got))
    del llm
    models.release()
    ok = all(v == len(jobs) for v in same.values())
    return ok, (", ".join(f"{k} {v}/{len(jobs)}" for k, v in same.items())
                + f" prompts with the same {n_tokens} greedy tokens (HF peft vs one vLLM engine, bf16)")


def _live_cuda_tensors(top: int = 5) -> str:
    """The largest CUDA tensors still alive, and who holds them (for a memory-release failure)."""
    import gc

    import torch

    found = []
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.is_cuda:
                holders = [type(r).__name__ for r in gc.get_referrers(obj)[:4]]
                found.append((obj.numel() * obj.element_size(), tuple(obj.shape), str(obj.dtype), holders))
        except Exception:  # noqa: BLE001 - some objects refuse inspection
            continue
    found.sort(reverse=True)
    return "; ".join(f"{s / 2**20:.0f} MiB {shape} {dt} held by {h}" for s, shape, dt, h in found[:top]) or "none"


def _cuda_probe() -> dict:
    import torch

    cuda = torch.cuda.is_available()
    return {"cuda": cuda, "device": torch.cuda.get_device_name() if cuda else "cpu"}


def run_checks(device: str, arch: str | None, out: Path | None = None, tokenizer_dir: str | None = None) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="emlab-gpucheck-") as tmp:
        checks = Checks(device, arch, Path(tmp), tokenizer_dir)
        for name in ("environment", "training", "resume", "sampling", "hooks", "slurm_local", "bench_mfu",
                     "vllm_equal"):
            checks.run(name, getattr(checks, name))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpucheck.json").write_text(json.dumps(checks.results, indent=2))
    return checks.results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m emlab.gpucheck", description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="auto: cuda when visible, else skip with one line; cpu: run on a tiny model (tests)")
    p.add_argument("--arch", default=None, help="model shape (emlab.models.PRESETS); default qwen2.5-0.5b on "
                                                "GPU, a tiny Llama on CPU")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the embedded SmolLM2's)")
    p.add_argument("--out", default=None, help="also write gpucheck.json here")
    args = p.parse_args(argv)
    from emlab.logs import setup_logging

    setup_logging(logging.WARNING)
    import torch

    device = args.device
    if device == "auto":
        if not torch.cuda.is_available():
            print("gpu-check: skipped: torch sees no CUDA device on this machine (run it on a GPU machine)")
            return 0
        device = "cuda"
    arch = args.arch or ("qwen2.5-0.5b" if device == "cuda" else None)
    t0 = time.perf_counter()
    results = run_checks(device, arch, Path(args.out) if args.out else None, args.tokenizer)
    failed = [r["check"] for r in results if r["status"] == "FAIL"]
    print(f"gpu-check: {len(results) - len(failed)} of {len(results)} checks passed or skipped, "
          f"{len(failed)} failed{': ' + ', '.join(failed) if failed else ''} ({time.perf_counter() - t0:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
