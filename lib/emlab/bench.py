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
import logging
import os
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

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


def _measure(spec_json: dict, preset: str, batch: int, seq_len: int, steps: int, warmup: int) -> dict[str, Any]:
    """One row: load the model, apply the preset, time ``steps`` AdamW steps (run in a fresh process)."""
    import torch

    from emlab import models
    from emlab.config import ModelSpec
    from emlab.train import TrainConfig, apply_preset

    spec = ModelSpec(**spec_json)
    cuda = torch.cuda.is_available()
    torch.manual_seed(0)
    model, _ = models.load_model(spec)
    n_params = models._n_params(model)
    cfg = TrainConfig(model=spec, preset=preset, gradient_checkpointing=spec.load_in_4bit)
    model = apply_preset(model, cfg)
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    device = next(p.device for p in model.parameters() if p.device.type != "meta")
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (batch, seq_len), device=device)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            loss = model(input_ids=ids, labels=ids).loss
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
    tok_s = batch * seq_len * steps / dt
    row = {"device": torch.cuda.get_device_name() if cuda else f"cpu ({os.cpu_count()} cores)",
           "model": spec.name, "params_M": round(n_params / 1e6, 1), "preset": preset,
           "4bit": spec.load_in_4bit, "trainable_M": round(sum(p.numel() for p in params) / 1e6, 3),
           "batch": batch, "seq_len": seq_len, "steps": steps, "s_per_step": round(dt / steps, 3),
           "tokens_per_s": round(tok_s, 1), "peak_rss_GiB": round(rss.peak / 2**30, 2)}
    if cuda:
        peak = peak_bf16_flops(torch.cuda.get_device_name())
        row["peak_gpu_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        row["MFU_pct"] = round(100 * 6 * n_params * tok_s / peak, 2) if peak else None
    return row


def _in_fresh_process(*args) -> dict[str, Any]:
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(_measure, *args).result()


def bench_train(device: str = "all", *, steps: int = 2, warmup: int = 1, cpu_batch: int = 4, cpu_seq: int = 128,
                gpu_batch: int = 4, gpu_seq: int = 512, presets: tuple[str, ...] | None = None,
                gpu_archs: tuple[str, ...] = GPU_ARCHS) -> pd.DataFrame:
    """Tokens/s and peak memory per preset (see the module docstring). ``device``: cpu, gpu or all;
    the GPU part is skipped with a log line when CUDA is not available."""
    import torch

    from emlab.config import ModelSpec

    rows = []
    if device in ("cpu", "all"):
        spec = ModelSpec(name="SmolLM2-135M-Instruct", source="embedded", dtype="float32")
        for preset in presets or CPU_PRESETS:
            log.info("bench cpu %s", preset)
            rows.append(_in_fresh_process(spec.model_dump(), preset, cpu_batch, cpu_seq, steps, warmup))
    if device in ("gpu", "all"):
        if not torch.cuda.is_available():
            log.warning("bench gpu: no CUDA device here, skipped (run `make bench-train` on a GPU machine)")
        else:
            for arch in gpu_archs:
                spec = ModelSpec(name=f"random-{arch}", source="random", arch=arch, load_in_4bit=True,
                                 dtype="bfloat16")
                for preset in presets or GPU_PRESETS:
                    log.info("bench gpu %s %s", arch, preset)
                    try:
                        rows.append(_in_fresh_process(spec.model_dump(), preset, gpu_batch, gpu_seq, steps, warmup))
                    except Exception as err:  # noqa: BLE001 - one OOM must not lose the other rows
                        log.error("bench gpu %s %s failed: %s", arch, preset, err)
                        rows.append({"device": torch.cuda.get_device_name(), "model": spec.name, "preset": preset,
                                     "4bit": True, "error": f"{type(err).__name__}: {str(err)[:120]}"})
    return pd.DataFrame(rows)


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
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.what == "sample":
        return _main_sample(args)
    df = bench_train(args.device, steps=args.steps)
    note = ("Optimizer steps on random token batches (speed does not depend on values). CPU: SmolLM2-135M "
            "float32. GPU: random Qwen2.5-shaped models in 4-bit NF4 with gradient checkpointing; "
            "MFU = 6·N·tokens/s ÷ peak dense bf16 FLOP/s. Shared machines vary ±2×: compare rows of one run.")
    csv, md = write_table(df, "train", Path(args.out), note)
    print(md.read_text())
    print(f"wrote {csv} and {md}", file=sys.stderr)
    return 0


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
