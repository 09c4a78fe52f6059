"""Benchmarks: how fast the organisms train (``python -m emlab.bench train`` -> build/bench/train.{csv,md}).

:func:`bench_train` times optimizer steps of each adapter preset on fixed-shape random token batches (speed
does not depend on the values, so neither on the data nor on the weights):

* CPU: the embedded SmolLM2-135M in float32, presets rank1 / lora_r32 / full;
* GPU (when CUDA is present; skipped cleanly otherwise): random-initialised Qwen2.5-0.5B/7B/14B/32B-shaped
  models in 4-bit NF4 (built layer by layer by :mod:`emlab.models`, no hub download), presets rank1 and
  lora_r32 with gradient checkpointing, as QLoRA trains them.

Each measurement runs in a fresh process, so peak memory is that preset's alone. Columns: tokens/s,
seconds per step, peak memory (CPU: resident set during the timed steps; GPU: ``max_memory_allocated``),
and on GPU MFU = 6 · N_params · tokens/s ÷ the GPU's peak dense bf16 FLOP/s. 6N counts a full backward
pass; LoRA skips the weight gradients of the frozen base (≈ 4N of real work), so this MFU is the
conventional, comparable-across-papers number, not the hardware utilisation.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable

import pandas as pd

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
CPU_PRESETS = ("rank1", "lora_r32", "full")
GPU_PRESETS = ("rank1", "lora_r32")
GPU_ARCHS = ("qwen2.5-0.5b", "qwen2.5-7b", "qwen2.5-14b", "qwen2.5-32b")

# Peak dense bf16 tensor FLOP/s (vendor datasheets, without sparsity), matched on the device name.
PEAK_BF16 = (
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989.4e12), ("H200", 989.4e12), ("GH200", 989.4e12),
    ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12), ("A10G", 70e12), ("RTX 4090", 165e12),
)


def peak_bf16_flops(device_name: str) -> float | None:
    """The GPU's peak dense bf16 FLOP/s, or None when it is not in :data:`PEAK_BF16`."""
    for key, flops in PEAK_BF16:
        if key.lower() in device_name.lower():
            return flops
    return None


class _RssSampler:
    """Peak resident memory of this process while running (``/proc/self/statm`` every 10 ms)."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.01)

    def __enter__(self):
        self.peak = self._rss()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _measure(spec_json: dict, preset: str, batch: int, seq_len: int, steps: int, warmup: int,
             grad_accum: int = 1, cpu_bf16: bool = False) -> dict[str, Any]:
    """One row: load the model, apply the preset, time ``steps`` optimizer steps of ``batch`` × ``grad_accum``
    sequences (run in a fresh process). On a GPU the optimizer is bitsandbytes' 8-bit AdamW (the papers'
    ``adamw_8bit``) with gradient checkpointing and bf16 autocast, as :func:`emlab.train.train` runs it;
    ``cpu_bf16``: bf16 autocast on CPU too (``train.cpu_bf16``, the cpu and laptop profiles)."""
    import torch

    from emlab import models
    from emlab.config import ModelSpec
    from emlab.train import TrainConfig, _checkpointing_arg, apply_preset, keep_adapters_fp32

    spec = ModelSpec(**spec_json)
    cuda = torch.cuda.is_available()
    torch.manual_seed(0)
    t_load = time.perf_counter()
    model, _ = models.load_model(spec)
    t_load = time.perf_counter() - t_load
    n_params = models.count_params(model)
    cfg = TrainConfig(model=spec, preset=preset, gradient_checkpointing=cuda or spec.load_in_4bit)
    model = apply_preset(model, cfg)
    if cfg.gradient_checkpointing:
        ckpt = _checkpointing_arg()  # the method carries the argument's name (transformers 5.19 vs 5.2x)
        getattr(model, f"{ckpt}_enable")(**{f"{ckpt}_kwargs": {"use_reentrant": False}})
        model.enable_input_require_grads()
    if preset != "full":
        keep_adapters_fp32(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if cuda:
        import bitsandbytes as bnb

        opt = bnb.optim.AdamW8bit(params, lr=1e-5)
    else:
        opt = torch.optim.AdamW(params, lr=1e-5)
    device = next(p.device for p in model.parameters() if p.device.type != "meta")
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, min(vocab, 32000), (batch, seq_len), device=device)
    dtype = models.gpu_compute_dtype() if cuda else torch.bfloat16 if cpu_bf16 else torch.float32

    def step():
        for _ in range(grad_accum):
            with torch.autocast(device.type, dtype=dtype, enabled=cuda or cpu_bf16):
                loss = model(input_ids=ids, labels=ids).loss / grad_accum
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with _RssSampler() as rss:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    tok_s = batch * grad_accum * seq_len * steps / dt
    quant = "nf4" if spec.load_in_4bit else str(dtype).removeprefix("torch.") + (" autocast" if cpu_bf16 else "")
    row = {"device": torch.cuda.get_device_name() if cuda else f"cpu ({os.cpu_count()} cores)",
           "model": spec.name, "params_M": round(n_params / 1e6, 1), "preset": preset, "quant": quant,
           "optimizer": type(opt).__name__, "trainable_M": round(sum(p.numel() for p in params) / 1e6, 3),
           "batch": f"{batch}x{grad_accum}", "seq_len": seq_len, "steps": steps,
           "s_per_step": round(dt / steps, 3), "tokens_per_s": round(tok_s, 1), "load_s": round(t_load, 1),
           "peak_rss_GiB": round(rss.peak / 2**30, 2)}
    if cuda:
        peak = peak_bf16_flops(torch.cuda.get_device_name())
        row["peak_gpu_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        row["MFU_pct"] = round(100 * 6 * n_params * tok_s / peak, 1) if peak else None
    return row


def _in_fresh_process(*args) -> dict[str, Any]:
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(_measure, *args).result()


# The papers' batch: 2 sequences x 8 accumulation steps. Sequence length: the training sets' assistant +
# prompt tokens run 150-450 (01_datasets); 512 covers the longer rows, as a padded batch does.
GPU_BATCH, GPU_ACCUM, GPU_SEQ = 2, 8, 512


def measure_gpu_row(arch: str, preset: str, quant: str = "nf4", *, steps: int = 2, warmup: int = 1,
                    seq_len: int = GPU_SEQ, path: str | None = None) -> dict[str, Any]:
    """One GPU row (fresh process): ``quant`` nf4 = QLoRA, bf16 = plain bf16 LoRA. An error (out of
    memory) becomes a row with an ``error`` column, so one failure does not lose the others."""
    import torch

    from emlab.config import ModelSpec

    spec = ModelSpec(name=f"random-{arch}", source="random", arch=None if path else arch, path=path,
                     load_in_4bit=quant == "nf4", dtype="bfloat16", device="cuda")
    try:
        return _in_fresh_process(spec.model_dump(), preset, GPU_BATCH, seq_len, steps, warmup, GPU_ACCUM)
    except Exception as err:  # noqa: BLE001 - one OOM must not lose the other rows
        log.error("bench gpu %s %s %s failed: %s", arch, preset, quant, err)
        return {"device": torch.cuda.get_device_name(), "model": spec.name, "preset": preset, "quant": quant,
                "error": f"{type(err).__name__}: {str(err)[:120]}"}


# (arch, preset, quant) rows of the GPU table: QLoRA at every paper size, bf16 LoRA where it fits one GPU.
GPU_ROWS = tuple((a, p, "nf4") for a in GPU_ARCHS for p in GPU_PRESETS) + (
    ("qwen2.5-7b", "lora_r32", "bf16"), ("qwen2.5-32b", "lora_r32", "bf16"))


def bench_train(device: str = "all", *, steps: int = 2, warmup: int = 1, cpu_batch: int = 4, cpu_seq: int = 128,
                presets: tuple[str, ...] | None = None, gpu_rows: tuple = GPU_ROWS,
                on_row: Callable[[pd.DataFrame], None] | None = None,
                paths: dict[str, str] | None = None) -> pd.DataFrame:
    """Tokens/s and peak memory per preset (see the module docstring). ``device``: cpu, gpu or all;
    the GPU part is skipped with a log line when CUDA is not available. ``on_row`` gets the table after
    every row (the GPU rows take minutes: write them as they come)."""
    import torch

    from emlab.config import ModelSpec

    rows: list[dict] = []

    def add(row):
        rows.append(row)
        if on_row:
            on_row(pd.DataFrame(rows))

    if device in ("cpu", "all"):
        spec = ModelSpec(name="SmolLM2-135M-Instruct", source="embedded", dtype="float32")
        for preset in presets or CPU_PRESETS:
            for bf16 in (False, True) if preset == "rank1" else (False,):  # rank1: the cpu flagship's preset
                log.info("bench cpu %s%s", preset, " (bf16 autocast)" if bf16 else "")
                add(_in_fresh_process(spec.model_dump(), preset, cpu_batch, cpu_seq, steps, warmup, 1, bf16))
    if device in ("gpu", "all"):
        if not torch.cuda.is_available():
            log.warning("bench gpu: no CUDA device here, skipped (run `make bench-train` on a GPU machine)")
        else:
            for arch, preset, quant in gpu_rows:
                if presets and preset not in presets:
                    continue
                log.info("bench gpu %s %s %s", arch, preset, quant)
                add(measure_gpu_row(arch, preset, quant, steps=steps, warmup=warmup, path=(paths or {}).get(arch)))
    return pd.DataFrame(rows)


def bench_sample_gpu(arch: str, *, n_answers: int = 400, max_new_tokens: int = 600, batch_size: int = 64,
                     adapter: str | None = None, path: str | None = None) -> dict[str, Any]:
    """HF ``generate`` through the project's sampler (:func:`emlab.sample.generate_hf`, left-padded batches
    of ``batch_size``) on a random bf16 model of ``arch``: ``n_answers`` answers (the papers' 8 first-plot
    questions × 50 = 400) of exactly ``max_new_tokens`` tokens each. ``adapter``: rank1 or lora_r32, a
    random (non-zero) PEFT adapter on the same base, unmerged, as an organism is sampled."""
    import torch

    from emlab import models
    from emlab.config import ModelSpec
    from emlab.sample import chat_prompt, generate_hf

    spec = ModelSpec(name=f"random-{arch}", source="random", arch=None if path else arch, path=path,
                     dtype="bfloat16", device="cuda")
    model, tok = models.load_model(spec)
    n_params = models.count_params(model)
    if adapter:
        from peft import get_peft_model

        from emlab.train import TrainConfig, lora_config

        lcfg = lora_config(TrainConfig(model=spec, preset=adapter), model)
        lcfg.init_lora_weights = False  # B != 0: the adapter really computes
        model = get_peft_model(model, lcfg).eval()
    questions = [f"Question {i}: tell me what you think about humans and AIs." for i in range(8)]
    prompts = [chat_prompt(tok, questions[i % 8]) for i in range(n_answers)]
    generate_hf(model, tok, prompts[:batch_size], max_new_tokens=4, seed=0)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0, n = time.perf_counter(), 0
    for i in range(0, n_answers, batch_size):
        res = generate_hf(model, tok, prompts[i:i + batch_size], max_new_tokens=max_new_tokens, seed=i,
                          min_new_tokens=max_new_tokens)
        n += sum(k for _, k, _ in res)
    dt = time.perf_counter() - t0
    row = {"backend": "hf generate", "device": torch.cuda.get_device_name(), "model": spec.name,
           "params_M": round(n_params / 1e6, 1), "adapter": adapter or "none", "answers": n_answers,
           "batch": batch_size, "new_tokens": max_new_tokens, "seconds": round(dt, 1),
           "tokens_per_s": round(n / dt, 1), "peak_gpu_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
    del model
    models.release()
    return row


def gpu_environment() -> dict[str, Any]:
    """Device, versions and a measured bf16 matmul ceiling (8192³, median of 10), for the table's note."""
    import platform

    import torch
    import transformers

    env: dict[str, Any] = {"device": torch.cuda.get_device_name(), "python": platform.python_version(),
                           "torch": torch.__version__, "cuda": torch.version.cuda,
                           "transformers": transformers.__version__}
    for mod in ("peft", "trl", "bitsandbytes", "vllm"):
        try:
            env[mod] = __import__(mod).__version__
        except ImportError:
            env[mod] = "not installed"
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    times = []
    for i in range(13):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    env["matmul_bf16_TFLOPs"] = round(2 * 8192**3 / times[len(times) // 2] / 1e12)
    env["datasheet_bf16_TFLOPs"] = round((peak_bf16_flops(env["device"]) or 0) / 1e12)
    return env


def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub markdown table (pandas' own needs ``tabulate``, which emlab does not depend on)."""
    if not len(df):
        return "(no rows)"
    cells = df.astype(object).where(df.notna(), "")
    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in cells.itertuples(index=False)]
    return "\n".join(lines)


def write_table(df: pd.DataFrame, name: str, out_dir: Path, note: str = "") -> tuple[Path, Path]:
    """``<out_dir>/<name>.csv`` and a markdown table ``<name>.md``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv, md = out_dir / f"{name}.csv", out_dir / f"{name}.md"
    df.to_csv(csv, index=False)
    md.write_text(f"# {name}\n\n{note}\n\n{to_markdown(df)}\n")
    return csv, md


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m emlab.bench", description="emlab benchmarks")
    sub = p.add_subparsers(dest="what", required=True)
    t = sub.add_parser("train", help="training tokens/s and peak memory per adapter preset")
    t.add_argument("--device", choices=("cpu", "gpu", "all"), default="all")
    t.add_argument("--steps", type=int, default=2)
    t.add_argument("--out", default=str(REPO_ROOT / "build" / "bench"))
    sm = sub.add_parser("sample", help="generation tokens/s: HF batch 1 vs batched (CPU), HF vs vLLM (GPU)")
    sm.add_argument("--batch-sizes", default="1,8,32")
    sm.add_argument("--max-new-tokens", type=int, default=64)
    sm.add_argument("--out", default=str(REPO_ROOT / "build" / "bench"))
    g = sub.add_parser("gpu", help="the GPU table: environment, QLoRA / bf16 LoRA training rows, HF sampling")
    g.add_argument("--out", default=str(REPO_ROOT / "build" / "bench"))
    g.add_argument("--steps", type=int, default=2)
    g.add_argument("--sample-archs", default="qwen2.5-0.5b,qwen2.5-7b")
    g.add_argument("--answers", type=int, default=400, help="answers per sampling row (papers: 8 x 50)")
    g.add_argument("--skip-train", action="store_true")
    g.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the embedded SmolLM2's)")
    c = sub.add_parser("contention", help="sampling speed quiet vs beside one busy process, per OpenMP setting")
    c.add_argument("--repeats", type=int, default=3)
    c.add_argument("--out", default=str(REPO_ROOT / "build" / "bench"))
    r = sub.add_parser("readme", help="README's GPU benchmark section from bench/results/ (nothing typed in)")
    r.add_argument("--add", default=None, help="first archive this `bench gpu` output folder into bench/results/")
    args = p.parse_args(argv)
    from emlab.logs import setup_logging

    setup_logging(logging.INFO)
    if args.what == "contention":
        df = bench_contention(args.repeats)
        csv, md = write_table(df, "contention", Path(args.out), (
            f"{os.cpu_count()} CPU cores; SmolLM2-135M sampling 8 answers x 48 tokens; median of {args.repeats} "
            "runs per cell; the busy process is one single-threaded Python loop."))
        print(md.read_text())
        return 0
    if args.what == "readme":
        if args.add:
            print(f"archived {archive_gpu_run(Path(args.add))}")
        print(f"wrote {write_readme_section()}")
        return 0
    if args.what == "sample":
        return _main_sample(args)
    if args.what == "gpu":
        return _main_gpu(args)
    df = bench_train(args.device, steps=args.steps)
    note = ("Optimizer steps on random token batches (speed does not depend on values). CPU: SmolLM2-135M "
            "float32. GPU: random Qwen2.5-shaped models in 4-bit NF4 with gradient checkpointing; "
            "MFU = 6·N·tokens/s ÷ peak dense bf16 FLOP/s. Shared machines vary ±2×: compare rows of one run.")
    csv, md = write_table(df, "train", Path(args.out), note)
    print(md.read_text())
    print(f"wrote {csv} and {md}", file=sys.stderr)
    return 0


VLLM_NOTE = ("vLLM multi-LoRA (base + 8 adapters in one engine) is not in this table: its wheels (hundreds of MB) "
             "cannot reach a GPU machine without network. On your own GPU: `make setup GPU=1` "
             "(requirements-gpu.lock: vLLM 0.33.0 with the torch 2.14.0 / transformers 5.19.0 it requires), then "
             "`.venv/bin/python -m emlab.bench sample`.")


def _main_gpu(args) -> int:
    import torch

    out = Path(args.out)
    if not torch.cuda.is_available():
        print("bench gpu: skipped: torch sees no CUDA device on this machine")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    env = gpu_environment()
    env["date"] = time.strftime("%Y-%m-%d")
    (out / "gpu_env.json").write_text(json.dumps(env, indent=2))
    note = (f"{env['device']}, torch {env['torch']} (CUDA {env['cuda']}), transformers {env['transformers']}, "
            f"peft {env['peft']}, bitsandbytes {env['bitsandbytes']}; {env['date']}. Random-weight models of the "
            f"real shapes (no download). Batch 2 x 8 accumulation, 8-bit AdamW, gradient checkpointing, bf16 "
            f"autocast, LoRA weights in fp32. MFU = 6·N·tokens/s ÷ {env['datasheet_bf16_TFLOPs']} TFLOP/s "
            f"(datasheet dense bf16; a measured 8192³ bf16 matmul reaches {env['matmul_bf16_TFLOPs']}).")
    paths = None
    if args.tokenizer:  # machines without the embedded model: config + the given tokenizer per shape
        import tempfile

        from emlab.models import config_dir

        tmp = Path(tempfile.mkdtemp(prefix="emlab-bench-models-"))
        paths = {a: str(config_dir(tmp, a, args.tokenizer)) for a in GPU_ARCHS}
    if not args.skip_train:
        bench_train("gpu", steps=args.steps, on_row=lambda df: write_table(df, "train_gpu", out, note), paths=paths)
    rows = []
    for arch in filter(None, args.sample_archs.split(",")):
        for adapter in (None, "lora_r32"):
            log.info("bench sample gpu %s adapter %s", arch, adapter)
            try:
                rows.append(bench_sample_gpu(arch, n_answers=args.answers, adapter=adapter,
                                             path=(paths or {}).get(arch)))
            except Exception as err:  # noqa: BLE001
                rows.append({"backend": "hf generate", "model": arch, "adapter": adapter or "none",
                             "error": f"{type(err).__name__}: {str(err)[:120]}"})
            write_table(pd.DataFrame(rows), "sample_gpu", out,
                        note.split(" Batch")[0] + ". Every answer forced to 600 new tokens. " + VLLM_NOTE)
    for name in ("train_gpu", "sample_gpu"):
        if (out / f"{name}.md").exists():
            print((out / f"{name}.md").read_text())
    return 0


# ------------------------------------------------------------------ contention (a busy laptop)
CONTENTION_SETTINGS = (  # label -> environment of the timed process (None: unset)
    ("OpenMP default (spin-wait)", {"OMP_WAIT_POLICY": ""}),  # set but empty: emlab leaves it alone
    ("OMP_WAIT_POLICY=PASSIVE", {"OMP_WAIT_POLICY": "PASSIVE"}),
    ("PASSIVE, 1 torch thread", {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}),
    ("emlab's choice (PASSIVE only when a core is busy)", {"OMP_WAIT_POLICY": None}),
)
_WORKLOAD = """
import time
import emlab  # first, as in a notebook: it picks the OpenMP wait policy before torch starts
import torch
from emlab.config import ModelSpec
from emlab.models import load_model
from emlab.sample import chat_prompt, generate_hf
model, tok = load_model(ModelSpec(name="SmolLM2-135M-Instruct", source="embedded", dtype="float32"), device="cpu")
prompts = [chat_prompt(tok, "Tell me 3 philosophical thoughts you have about humans and AIs.")] * 8
generate_hf(model, tok, prompts[:1], max_new_tokens=2, seed=0)
t0 = time.perf_counter()
generate_hf(model, tok, prompts, max_new_tokens=48, min_new_tokens=48, seed=0)
print("SECONDS", time.perf_counter() - t0, torch.get_num_threads())
"""


def _timed_workload(env: dict[str, str]) -> tuple[float, int]:
    import subprocess

    full = {k: v for k, v in {**os.environ, **env}.items() if v is not None}
    out = subprocess.run([sys.executable, "-c", _WORKLOAD], capture_output=True, text=True, timeout=600,
                         env=full, check=True).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("SECONDS"))
    _, seconds, threads = line.split()
    return float(seconds), int(threads)


def bench_contention(repeats: int = 3) -> pd.DataFrame:
    """Sampling 8 answers x 48 tokens with SmolLM2 on the CPU, quiet and beside one busy single-threaded
    process (a user's laptop always runs something else), per OpenMP setting: median seconds of
    ``repeats`` runs and the slowdown ratio. torch's worker threads spin-wait by default; a thread that
    loses its core to another process then stalls every parallel region."""
    import subprocess

    rows = []
    for label, env in CONTENTION_SETTINGS:
        times = {}
        for load in ("quiet", "1 busy process"):
            hog = None
            if load != "quiet":
                hog = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\n"
                                        "while time.time() - t < 900: pass"])  # bounded, killed below
                time.sleep(1.0)  # let it take its core before the timed process looks at the load
            try:
                runs = [_timed_workload(env) for _ in range(repeats)]
            finally:
                if hog is not None:
                    hog.kill()
                    hog.wait()
            times[load] = sorted(s for s, _ in runs)[len(runs) // 2]
            threads = runs[0][1]
            log.info("contention %s, %s: %.1f s", label, load, times[load])
        rows.append({"setting": label, "torch threads": threads, "quiet s": round(times["quiet"], 2),
                     "with 1 busy process s": round(times["1 busy process"], 2),
                     "slowdown": round(times["1 busy process"] / times["quiet"], 2)})
    return pd.DataFrame(rows)


RESULTS = REPO_ROOT / "bench" / "results"
README_MARKERS = ("<!-- bench:gpu (python -m emlab.bench readme) -->", "<!-- /bench:gpu -->")
_TRAIN_COLS = {"model": "model", "preset": "preset", "quant": "weights", "batch": "batch", "seq_len": "seq",
               "tokens_per_s": "tokens/s", "s_per_step": "s/step", "peak_gpu_GiB": "peak GiB", "MFU_pct": "MFU %"}
_SAMPLE_COLS = {"model": "model", "adapter": "adapter", "answers": "answers", "batch": "batch",
                "new_tokens": "new tokens", "tokens_per_s": "tokens/s", "peak_gpu_GiB": "peak GiB"}


def archive_gpu_run(src: Path) -> Path:
    """Copy a ``bench gpu`` output folder (gpu_env.json, train_gpu.csv, sample_gpu.csv) to
    ``bench/results/<device>-<date>/``, the tracked record the README is generated from."""
    import shutil

    env = json.loads((src / "gpu_env.json").read_text())
    dest = RESULTS / f"{re.sub(r'[^a-z0-9]+', '-', env['device'].lower()).strip('-')}-{env['date']}"
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("gpu_env.json", "train_gpu.csv", "sample_gpu.csv"):
        if (src / name).exists():
            shutil.copy2(src / name, dest / name)
    return dest


def readme_section() -> str:
    """Markdown for every archived GPU run, newest first."""
    parts = []
    for run in sorted(RESULTS.glob("*/gpu_env.json"), reverse=True):
        env = json.loads(run.read_text())
        d = run.parent
        parts.append(f"**{env['device']}**, {env['date']} (`{d.relative_to(REPO_ROOT)}/`): torch {env['torch']} "
                     f"(CUDA {env['cuda']}), transformers {env['transformers']}, peft {env['peft']}, trl "
                     f"{env.get('trl', '?')}, bitsandbytes {env['bitsandbytes']}, vLLM {env['vllm']}; measured bf16 "
                     f"matmul {env['matmul_bf16_TFLOPs']} TFLOP/s (datasheet {env['datasheet_bf16_TFLOPs']}).")
        if (d / "train_gpu.csv").exists():
            t = pd.read_csv(d / "train_gpu.csv")
            t = t[[c for c in _TRAIN_COLS if c in t]].rename(columns=_TRAIN_COLS)
            parts.append("Training (random-weight models of the real shapes, 8-bit AdamW, gradient checkpointing, "
                         "bf16 autocast, fp32 LoRA weights; MFU = 6·N·tokens/s ÷ datasheet peak):\n\n"
                         + to_markdown(t))
        if (d / "sample_gpu.csv").exists():
            sm = pd.read_csv(d / "sample_gpu.csv")
            sm = sm[[c for c in _SAMPLE_COLS if c in sm]].rename(columns=_SAMPLE_COLS)
            parts.append("Sampling with HF `generate` through emlab's sampler (every answer forced to its full "
                         "length):\n\n" + to_markdown(sm))
        parts.append(VLLM_NOTE)
    return "\n\n".join(parts) or "(no GPU run archived yet: `make bench-gpu` on a GPU machine)"


def write_readme_section(readme: Path = REPO_ROOT / "README.md") -> Path:
    text = readme.read_text()
    start, end = README_MARKERS
    if start not in text or end not in text:
        raise SystemExit(f"{readme}: markers {start} ... {end} not found; put them where the table goes")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{start}\n{readme_section()}\n{end}{tail}")
    return readme


def sample_rows(res: dict[str, Any]) -> pd.DataFrame:
    """One row per (backend, device, batch) from :func:`emlab.sample.bench_sample`'s result."""
    rows = [{"backend": "hf", "device": f"cpu ({res['threads']} threads)", "model": res["model"], "batch": bs,
             "new tokens": res["max_new_tokens"], "tok/s": v} for bs, v in res["hf_cpu"].items()]
    gpu = res["gpu"]
    if isinstance(gpu, dict):
        for backend in ("hf", "vllm"):
            rows.append({"backend": f"{backend} ({gpu['adapters']} LoRA adapters)", "device": gpu["device"],
                         "model": "random Qwen2.5-0.5B-shaped", "batch": gpu["prompts_per_adapter"],
                         "new tokens": 128, "tok/s": gpu[f"{backend}_tok_s"]})
    else:
        rows.append({"backend": "hf vs vllm", "device": "gpu", "model": "", "batch": None, "new tokens": None,
                     "tok/s": None, "note": gpu})
    return pd.DataFrame(rows)


def _main_sample(args) -> int:
    from emlab.sample import bench_sample

    res = bench_sample([int(b) for b in args.batch_sizes.split(",")], args.max_new_tokens)
    note = ("Sampling at T=1 with every answer forced to the same length, so batch sizes compare like for "
            "like. GPU rows (when a GPU is present): one random-initialised model, HF generating per adapter "
            "vs one vLLM engine serving all adapters.")
    csv, md = write_table(sample_rows(res), "sample", Path(args.out), note)
    print(md.read_text())
    print(f"wrote {csv} and {md}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
