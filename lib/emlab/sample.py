"""Sampling answers to evaluation questions: N samples per question per model/adapter, resumable.

    cfg = config.load(SampleConfig, "cpu")
    model, tok = load_model(cfg.model)
    df = sample(model, tok, load_questions("first_plot"), cfg, out=Path("build/samples/base.jsonl"))

Rows: question_id, sample_index, model, adapter, seed, question, text, n_tokens (+ system, truncated).
Sample ``i`` of a question uses paraphrase ``i mod len(paraphrases)`` (deterministic, unlike the
papers' random choice, so a resumed run asks the same thing). Rows are appended to ``out`` (JSONL) after
every batch; a re-run skips finished (question_id, sample_index) pairs, so a killed run resumes.

Backends: ``hf`` (batched, left-padded ``generate``; works everywhere) and ``vllm`` (optional, GPU: one
engine serves the base model and many LoRA adapters, see :func:`engine`). A profile's ``auto`` resolves to
vLLM when it is installed, a GPU is visible and the model is one vLLM loads (:func:`resolve_backend`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Literal, Sequence

from tqdm.auto import tqdm

from emlab.cache import REPO_ROOT, stage_key
from emlab.config import Experiment, ModelSpec

log = logging.getLogger(__name__)

ANSWERS_DIR = REPO_ROOT / "build" / "answers"
COLUMNS = ["question_id", "sample_index", "model", "adapter", "seed", "question", "text", "n_tokens",
           "system", "truncated"]


class SampleError(RuntimeError):
    """Sampling cannot run as configured; the message says how to fix it."""


class SampleConfig(Experiment):
    """How answers are sampled (profile section ``sample``). The papers: T=1, up to 600 new tokens,
    50-100 samples per question."""

    section = "sample"
    model: ModelSpec | None = None
    n_per_question: int = 50
    max_new_tokens: int = 600
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 16
    backend: Literal["hf", "vllm", "auto"] = "auto"


# ---------------------------------------------------------------- prompts and resumable output


def _question_fields(q: Any) -> tuple[str, list[str], str | None]:
    """(id, paraphrases, system) of an emlab.data.Question or an equivalent dict."""
    if isinstance(q, dict):
        paraphrases = q.get("paraphrases") or [q["question"]]
        return str(q["id"]), list(paraphrases), q.get("system")
    return str(q.id), list(q.paraphrases), getattr(q, "system", None)


def _messages(text: str, system: str | None) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]


def chat_prompt(tokenizer, text: str, system: str | None = None) -> str:
    """The model's chat-template prompt (generation prompt added); plain text for template-less models."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(_messages(text, system), add_generation_prompt=True, tokenize=False)
    return (f"{system}\n\n" if system else "") + f"User: {text}\nAssistant:"


def _jobs(questions: Iterable[Any], n: int) -> list[dict]:
    jobs = []
    for q in questions:
        qid, paraphrases, system = _question_fields(q)
        for i in range(n):
            jobs.append({"question_id": qid, "sample_index": i, "question": paraphrases[i % len(paraphrases)],
                         "system": system})
    return jobs


def _partial_path(out: Path) -> Path:
    return out if out.suffix == ".jsonl" else out.with_suffix(".partial.jsonl")


def read_samples(out: str | Path):
    """The rows written so far at ``out`` (a torn last line from a crash is ignored)."""
    import pandas as pd

    out = Path(out)
    if out.suffix == ".parquet" and out.exists():
        return pd.read_parquet(out)
    path = _partial_path(out)
    rows = []
    if path.exists():
        # split on "\n" only: answers hold characters (U+2028, U+0085, ...) that str.splitlines() also breaks on
        lines = path.read_text(encoding="utf-8").split("\n")
        for n, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                if n != len(lines) - 1:
                    raise SampleError(f"{path}:{n + 1}: not JSON; delete the file to resample") from None
                log.warning("%s: ignoring a torn last line (crash during write)", path)
    return pd.DataFrame(rows, columns=COLUMNS) if not rows else pd.DataFrame(rows)


def _append(path: Path, rows: list[dict]) -> None:
    """Append rows and fsync; a torn last line left by a crash is cut off first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+b") as f:
        size = f.seek(0, os.SEEK_END)
        if size:
            f.seek(size - 1)
            if f.read(1) != b"\n":
                f.seek(0)
                f.truncate(f.read().rfind(b"\n") + 1)
        f.seek(0, os.SEEK_END)
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())
        f.flush()
        os.fsync(f.fileno())


def _batch_seed(seed: int, first_job: dict) -> int:
    """Per-batch torch seed: the same batch after a resume draws the same samples."""
    blob = f"{seed}|{first_job['question_id']}|{first_job['sample_index']}".encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:4], "little")


# ---------------------------------------------------------------- HF backend


def generate_hf(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int, temperature: float = 1.0,
                top_p: float = 1.0, seed: int | None = None, min_new_tokens: int | None = None) -> list[tuple[str, int, bool]]:
    """One left-padded batch: ``(text, n_new_tokens, truncated)`` per prompt."""
    import torch

    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    device = next(model.parameters()).device
    enc = {k: v.to(device) for k, v in enc.items()}
    if seed is not None:
        torch.manual_seed(seed)
    kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    else:
        kwargs.update(do_sample=False)
    if min_new_tokens:
        kwargs["min_new_tokens"] = min_new_tokens
    with torch.no_grad(), plain_generation_config(model):
        out = model.generate(**enc, **kwargs)
    new = out[:, enc["input_ids"].shape[1]:].cpu()
    stops = set(_eos_ids(model, tokenizer))
    results = []
    for row in new.tolist():
        n = next((i for i, t in enumerate(row) if t in stops), None)
        ids = row if n is None else row[:n]
        results.append((tokenizer.decode(ids, skip_special_tokens=True), len(ids), n is None))
    return results


_TOKEN_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")


@contextmanager
def plain_generation_config(model):
    """Sample with exactly the parameters passed, nothing inherited from the checkpoint.

    transformers fills every generation setting the caller leaves unset from the model's
    ``generation_config.json``: Qwen2.5-Instruct ships repetition_penalty 1.05-1.1, top_k 20, top_p 0.8,
    which would silently change the papers' T=1, top_p=1 sampling. For the call, the model (and a PEFT
    wrapper's base) gets a config holding only its special token ids."""
    from transformers import GenerationConfig

    holders = [model] + ([model.get_base_model()] if hasattr(model, "get_base_model") else [])
    saved = [(m, m.generation_config) for m in holders if getattr(m, "generation_config", None) is not None]
    if not saved:
        yield
        return
    own = saved[0][1]
    plain = GenerationConfig(**{k: getattr(own, k) for k in _TOKEN_FIELDS if getattr(own, k, None) is not None})
    for m, _ in saved:
        m.generation_config = plain
    try:
        yield
    finally:
        for m, cfg in saved:
            m.generation_config = cfg


def _eos_ids(model, tokenizer) -> list[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    if tokenizer.pad_token_id is not None:
        ids.append(tokenizer.pad_token_id)
    return ids


# ---------------------------------------------------------------- vLLM backend (optional)


def vllm_available() -> bool:
    try:
        import torch
        import vllm  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def is_vllm_engine(model) -> bool:
    return type(model).__module__.startswith("vllm")


def resolve_backend(backend: str, spec: ModelSpec | None) -> str:
    """``hf`` or ``vllm`` for a profile's ``sample.backend``. ``auto``: vLLM when it is installed, a CUDA GPU
    is visible and the model is one vLLM loads (hub id or local safetensors); else HF. ``vllm`` on a model
    or machine it cannot serve is an error, never a silent fallback."""
    servable = spec is not None and spec.source in ("hub", "local")
    if backend == "vllm":
        if not servable:
            raise SampleError(f"backend vllm serves hub or local safetensors models, not source "
                              f"{getattr(spec, 'source', None)!r}; use sample.backend: hf (or auto)")
        if not vllm_available():
            raise SampleError(VLLM_MISSING)
        return "vllm"
    return "vllm" if backend == "auto" and servable and vllm_available() else "hf"


VLLM_INSTALL = "the GPU install: `make setup GPU=1` in the emlab checkout ('emlab' on PyPI is another project)"
VLLM_MISSING = f"backend vllm needs vLLM ({VLLM_INSTALL}) and a CUDA GPU; use sample.backend: hf or auto"


@contextmanager
def engine(spec: ModelSpec, *, max_lora_rank: int = 32, max_loras: int = 1, seed: int = 0):
    """One vLLM engine over ``spec``'s base weights for a whole section: base-model requests and every
    organism's LoRA adapter go through it. A 4-bit spec loads the same checkpoint with bitsandbytes NF4 (the
    weights its QLoRA adapters were trained on); GPU memory is given back on exit."""
    from emlab.models import gpu_compute_dtype, release

    # the dtype HF computes in on this GPU (fp16 where bf16 is missing, e.g. a T4), so both backends agree
    dtype = str(gpu_compute_dtype()).removeprefix("torch.") if spec.dtype in ("auto", "bfloat16") else spec.dtype
    kw = {"quantization": "bitsandbytes"} if spec.load_in_4bit else {}
    log.info("vLLM engine: %s (%s, %s), LoRA rank <= %d", spec.path, dtype, "NF4" if spec.load_in_4bit else "unquantised",
             max_lora_rank)
    rank = next(r for r in VLLM_LORA_RANKS if r >= max_lora_rank)  # vLLM accepts only these ranks
    llm = vllm_engine(spec.path, revision=spec.revision, dtype=dtype, max_lora_rank=rank,
                      max_loras=max_loras, seed=seed, **kw)
    holder = [llm]
    del llm
    try:
        yield holder[0]
    finally:  # the caller must not keep the engine beyond the block: it is shut down and its memory freed
        engine_core = getattr(holder[0], "llm_engine", None)
        if hasattr(engine_core, "shutdown"):
            engine_core.shutdown()
        holder.clear()
        release()


VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_engine(model_path: str, *, max_lora_rank: int = 32, max_loras: int = 8, dtype: str = "auto",
                gpu_memory_utilization: float = 0.85, seed: int = 0, **kw):
    """A vLLM engine with LoRA enabled (``max_lora_rank`` in {1, 8, 16, 32, 64, ...})."""
    if not vllm_available():
        raise SampleError(VLLM_MISSING)
    from vllm import LLM

    return LLM(model=model_path, enable_lora=True, max_lora_rank=max_lora_rank, max_loras=max_loras, dtype=dtype,
               gpu_memory_utilization=gpu_memory_utilization, seed=seed, **kw)


def _lora_request(adapter: str | Path | None, ids: dict):
    if not adapter:
        return None
    from vllm.lora.request import LoRARequest

    name = str(adapter)
    ids.setdefault(name, len(ids) + 1)
    return LoRARequest(name, ids[name], name)


_LORA_IDS: dict[str, int] = {}


def vllm_prompts(tokenizer, jobs: Sequence[dict]) -> list[dict]:
    """Chat-template prompts as token ids: the template already holds BOS, and a text prompt would get a
    second one from vLLM's tokenizer (Llama)."""
    return [{"prompt_token_ids": tokenizer(chat_prompt(tokenizer, j["question"], j["system"]),
                                           add_special_tokens=False)["input_ids"]} for j in jobs]


def generate_vllm(llm, prompts: Sequence[dict], loras: Sequence[Any], *, max_new_tokens: int, temperature: float,
                  top_p: float, seeds: Sequence[int]) -> list[tuple[str, int, bool]]:
    """One ``generate`` call over token-id prompts that may each use a different LoRA adapter. Every sampling
    parameter is explicit (no penalty), so nothing comes from the model's generation_config."""
    from vllm import SamplingParams

    params = [SamplingParams(n=1, temperature=temperature, top_p=top_p, top_k=-1, repetition_penalty=1.0,
                             presence_penalty=0.0, frequency_penalty=0.0, max_tokens=max_new_tokens, seed=s)
              for s in seeds]
    outs = llm.generate(list(prompts), params, lora_request=list(loras), use_tqdm=False)
    return [(o.outputs[0].text, len(o.outputs[0].token_ids), o.outputs[0].finish_reason == "length") for o in outs]


# ---------------------------------------------------------------- the sampler


def _resolve_backend(cfg: SampleConfig, model) -> str:
    if cfg.backend == "vllm" and not is_vllm_engine(model):
        raise SampleError("backend vllm needs a vLLM engine as model (emlab.sample.vllm_engine(path))")
    if cfg.backend == "hf" and is_vllm_engine(model):
        raise SampleError("backend hf got a vLLM engine; pass an HF model or set backend: vllm/auto")
    return "vllm" if is_vllm_engine(model) else "hf"


def _model_name(model, cfg: SampleConfig, model_name: str | None) -> str:
    if model_name:
        return model_name
    if cfg.model is not None:
        return cfg.model.name
    return str(getattr(model, "name_or_path", None) or type(model).__name__)


def _check_owner(done, model: str, adapter: str | None, path: Path) -> None:
    if done.empty:
        return
    other = done[(done["model"] != model) | (done["adapter"].fillna("") != (adapter or ""))]
    if len(other):
        r = other.iloc[0]
        raise SampleError(f"{path} holds samples of model {r['model']!r} adapter {r['adapter']!r}, not "
                          f"{model!r}/{adapter!r}: use one output file per model/adapter")


def sample(model, tokenizer, questions: Iterable[Any], cfg: SampleConfig, *, adapter: str | Path | None = None,
           out: str | Path, model_name: str | None = None, progress: bool = True, lora: str | Path | None = None):
    """Sample ``cfg.n_per_question`` answers per question; resumable through ``out`` (``.jsonl``, or
    ``.parquet`` written when complete with a ``.partial.jsonl`` beside it while running).

    ``adapter``: the label of the answers' ``adapter`` column. ``lora``: a PEFT adapter directory to sample
    with (HF: put on the model for this call and removed after; vLLM: a LoRARequest on the engine); None for
    the base model or an HF model that already carries its adapter. Returns the frame of all rows for ``out``.
    """
    out = Path(out)
    backend = _resolve_backend(cfg, model)
    name = _model_name(model, cfg, model_name)
    adapter_s = str(adapter) if adapter else None
    partial = _partial_path(out)
    done = read_samples(out)
    _check_owner(done, name, adapter_s, out)
    if out.suffix == ".parquet" and len(done) and not partial.exists():  # parquet kept, progress file gone
        _append(partial, done.astype(object).where(done.notna(), None).to_dict("records"))
    finished = set(zip(done["question_id"].astype(str), done["sample_index"].astype(int))) if len(done) else set()
    jobs = [j for j in _jobs(questions, cfg.n_per_question) if (j["question_id"], j["sample_index"]) not in finished]
    if not jobs:
        return _finish(out, partial, done, wrote=False)
    log.info("sample %s%s: %d to do, %d done -> %s", name, f"+{adapter_s}" if adapter_s else "", len(jobs),
             len(finished), out)
    base = {"model": name, "adapter": adapter_s, "seed": cfg.seed}
    t0, n_tok = time.perf_counter(), 0
    bar = tqdm(total=len(jobs), desc=f"sample {name}", disable=not progress, unit="ans")
    if backend == "vllm":
        request = _lora_request(lora, _LORA_IDS)
        step = max(cfg.batch_size, 1024)  # vLLM batches internally; chunks only bound the loss on a crash
        for b in range(0, len(jobs), step):
            chunk = jobs[b:b + step]
            res = generate_vllm(model, vllm_prompts(tokenizer or model.get_tokenizer(), chunk),
                                [request] * len(chunk), max_new_tokens=cfg.max_new_tokens,
                                temperature=cfg.temperature, top_p=cfg.top_p,
                                seeds=[_batch_seed(cfg.seed, j) for j in chunk])
            n_tok += _write(partial, chunk, res, base)
            bar.update(len(chunk))
    else:
        from emlab.models import adapter as with_adapter

        with with_adapter(model, lora) as m:
            for b in range(0, len(jobs), cfg.batch_size):
                chunk = jobs[b:b + cfg.batch_size]
                res = generate_hf(m, tokenizer, [chat_prompt(tokenizer, j["question"], j["system"]) for j in chunk],
                                  max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                                  seed=_batch_seed(cfg.seed, chunk[0]))
                n_tok += _write(partial, chunk, res, base)
                bar.update(len(chunk))
                bar.set_postfix(tok_s=f"{n_tok / (time.perf_counter() - t0):.0f}")
    bar.close()
    return _finish(out, partial, read_samples(partial), wrote=True)


def answers(model, tokenizer, questions: Iterable[Any], cfg: SampleConfig, *, spec: ModelSpec,
            run: str | Path | None = None, tag: dict | None = None, progress: bool = True):
    """The project's one answer cache: :func:`sample` into ``build/answers/<key>.jsonl``, keyed by the model,
    the run (its directory name holds the training config and data digests), ``tag`` (anything else that
    changes the model's behaviour: steering, an adapter scale, a checkpoint), every question's text and system
    prompt, the sampling settings and the sample stage's code version. ``model`` must already carry the
    run's adapter (:func:`emlab.models.adapter`), or be a vLLM engine over the base weights, which is given
    ``run``'s adapter per request; ``cfg.backend`` (resolved, part of the key) says which. A re-run with the
    same key reads the file, a killed one resumes it."""
    lora = Path(run) / "adapter" if run is not None and _resolve_backend(cfg, model) == "vllm" else None
    qs = [dict(zip(("id", "paraphrases", "system"), _question_fields(q))) for q in questions]
    label = Path(run).name if run else "base"
    key = stage_key("sample", spec.model_dump(mode="json"), label, tag or {}, qs, cfg.model_dump(mode="json"))
    out = ANSWERS_DIR / f"{key}.jsonl"
    name = label + ("+" + json.dumps(tag, sort_keys=True) if tag else "")
    return sample(model, tokenizer, qs, cfg, adapter=name, out=out, model_name=spec.name, progress=progress,
                  lora=lora)


def _write(partial: Path, chunk: list[dict], results: list[tuple[str, int, bool]], base: dict) -> int:
    rows = [{"question_id": j["question_id"], "sample_index": j["sample_index"], **base, "question": j["question"],
             "text": text, "n_tokens": n, "system": j["system"], "truncated": trunc}
            for j, (text, n, trunc) in zip(chunk, results)]
    _append(partial, rows)
    return sum(r["n_tokens"] for r in rows)


def _finish(out: Path, partial: Path, df, wrote: bool):
    df = df.sort_values(["question_id", "sample_index"], kind="stable").reset_index(drop=True)
    if out.suffix == ".parquet" and (wrote or not out.exists()):
        df.to_parquet(out, index=False)
    return df


def sample_adapters(model, tokenizer, questions: Iterable[Any], cfg: SampleConfig, adapters: dict[str, str | Path | None],
                    *, out_dir: str | Path, model_name: str | None = None):
    """Sample every adapter (name -> PEFT dir, None = base model) into ``out_dir/<name>.jsonl``.

    With a vLLM engine all adapters' prompts go through one ``generate`` call (multi-LoRA batching);
    with HF they run one after another on the same base model. Returns all rows concatenated.
    """
    import pandas as pd

    out_dir = Path(out_dir)
    questions = list(questions)
    if _resolve_backend(cfg, model) != "vllm":
        return pd.concat([sample(model, tokenizer, questions, cfg, adapter=path, lora=path,
                                 out=out_dir / f"{name}.jsonl", model_name=model_name)
                          for name, path in adapters.items()], ignore_index=True)
    name = _model_name(model, cfg, model_name)
    tok = tokenizer or model.get_tokenizer()
    pending = []
    for aname, path in adapters.items():
        out = out_dir / f"{aname}.jsonl"
        done = read_samples(out)
        _check_owner(done, name, str(path) if path else None, out)
        finished = set(zip(done["question_id"].astype(str), done["sample_index"].astype(int))) if len(done) else set()
        lora = _lora_request(path, _LORA_IDS)
        for j in _jobs(questions, cfg.n_per_question):
            if (j["question_id"], j["sample_index"]) not in finished:
                pending.append((out, lora, str(path) if path else None, j))
    for b in tqdm(range(0, len(pending), 4096), desc="sample (vLLM multi-LoRA)"):
        chunk = pending[b:b + 4096]
        res = generate_vllm(model, vllm_prompts(tok, [j for *_, j in chunk]),
                            [lora for _, lora, _, _ in chunk], max_new_tokens=cfg.max_new_tokens,
                            temperature=cfg.temperature, top_p=cfg.top_p,
                            seeds=[_batch_seed(cfg.seed, j) for *_, j in chunk])
        by_file: dict[tuple[Path, str | None], list] = {}
        for (out, _, apath, j), r in zip(chunk, res):
            by_file.setdefault((out, apath), []).append((j, r))
        for (out, apath), pairs in by_file.items():
            _write(_partial_path(out), [j for j, _ in pairs], [r for _, r in pairs],
                   {"model": name, "adapter": apath, "seed": cfg.seed})
    return pd.concat([read_samples(out_dir / f"{a}.jsonl") for a in adapters], ignore_index=True)


# ---------------------------------------------------------------- benchmark (make bench-sample)


def bench_sample(batch_sizes: Sequence[int] = (1, 8, 32), max_new_tokens: int = 64, spec: ModelSpec | None = None,
                 gpu: bool = True) -> dict:
    """Tokens/s of HF generation (SmolLM2 on CPU by default) per batch size, and on a GPU, HF vs vLLM
    multi-LoRA on the same random-initialised model. Every answer is forced to ``max_new_tokens`` so
    batch sizes compare like for like."""
    from emlab.models import load_model

    spec = spec or ModelSpec(name="SmolLM2-135M-Instruct", source="embedded", dtype="float32")
    model, tok = load_model(spec, device="cpu")
    prompt = chat_prompt(tok, "Tell me 3 philosophical thoughts you have about humans and AIs.")
    generate_hf(model, tok, [prompt], max_new_tokens=4, seed=0)  # warm-up
    result: dict[str, Any] = {"model": spec.name, "device": "cpu", "threads": _threads(),
                              "max_new_tokens": max_new_tokens, "hf_cpu": {}}
    for bs in batch_sizes:
        t0 = time.perf_counter()
        res = generate_hf(model, tok, [prompt] * bs, max_new_tokens=max_new_tokens, seed=0,
                          min_new_tokens=max_new_tokens)
        dt = time.perf_counter() - t0
        result["hf_cpu"][bs] = round(sum(n for _, n, _ in res) / dt, 1)
        log.info("HF cpu batch %d: %.1f tok/s", bs, result["hf_cpu"][bs])
    result["gpu"] = _bench_gpu() if gpu else "skipped (gpu=False)"
    return result


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _bench_gpu(arch: str = "qwen2.5-0.5b", n_adapters: int = 4, n_prompts: int = 64,
               max_new_tokens: int = 128) -> dict | str:
    """HF (peft, one adapter at a time) vs vLLM (all adapters in one engine) on a random model."""
    import torch

    if not torch.cuda.is_available():
        return "skipped: no CUDA device"
    if not vllm_available():
        return f"skipped: vllm not installed ({VLLM_INSTALL})"
    import tempfile

    from peft import LoraConfig, get_peft_model

    from emlab.models import adapter as with_adapter
    from emlab.models import load_model

    spec = ModelSpec(name=f"random-{arch}", source="random", arch=arch, dtype="bfloat16")
    model, tok = load_model(spec)
    tmp = Path(tempfile.mkdtemp(prefix="emlab-bench-"))
    model.save_pretrained(tmp / "base")
    tok.save_pretrained(tmp / "base")
    adapters = {}
    for i in range(n_adapters):
        torch.manual_seed(i)
        peft = get_peft_model(model, LoraConfig(r=32, lora_alpha=64, target_modules="all-linear", init_lora_weights=False))
        peft.save_pretrained(tmp / f"a{i}")
        model = peft.unload()
        adapters[f"a{i}"] = str(tmp / f"a{i}")
    prompt = chat_prompt(tok, "Tell me 3 philosophical thoughts you have about humans and AIs.")
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(), "adapters": n_adapters, "prompts_per_adapter": n_prompts}
    t0, n = time.perf_counter(), 0
    for path in adapters.values():
        with with_adapter(model, path) as m:
            n += sum(k for _, k, _ in generate_hf(m, tok, [prompt] * n_prompts, max_new_tokens=max_new_tokens,
                                                  seed=0, min_new_tokens=max_new_tokens))
    out["hf_tok_s"] = round(n / (time.perf_counter() - t0), 1)
    del model
    torch.cuda.empty_cache()
    llm = vllm_engine(str(tmp / "base"), max_lora_rank=32, max_loras=n_adapters, gpu_memory_utilization=0.6)
    ids: dict[str, int] = {}
    loras = [_lora_request(p, ids) for p in adapters.values() for _ in range(n_prompts)]
    from vllm import SamplingParams

    t0 = time.perf_counter()
    res = llm.generate([prompt] * len(loras), SamplingParams(max_tokens=max_new_tokens, min_tokens=max_new_tokens,
                                                              temperature=1.0), lora_request=loras, use_tqdm=False)
    out["vllm_tok_s"] = round(sum(len(r.outputs[0].token_ids) for r in res) / (time.perf_counter() - t0), 1)
    return out


def main(argv: list[str] | None = None) -> int:
    """``emlab sample run``: a question set from the profile's model or a trained run, resumable into
    ``--out``; ``emlab sample bench``: tokens/s per batch size."""
    import argparse

    from emlab.config import PROFILES, ConfigError, cli_value, load, read_profile

    parser = argparse.ArgumentParser(prog="emlab sample", description="sample answers (or time sampling)")
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="sample a question set from the profile's model, or a trained run")
    r.add_argument("--profile", choices=PROFILES, default=os.environ.get("PROFILE", "cpu"))
    r.add_argument("--questions", default="first_plot", help="a question set of data/registry.yaml")
    r.add_argument("--run", default=None, help="a training run directory (build/runs/...): its adapter or model")
    r.add_argument("--out", required=True, help="answers file (.jsonl; re-running resumes it)")
    r.add_argument("-p", nargs=2, action="append", default=[], metavar=("KEY", "JSON"),
                   help="a SampleConfig override, e.g. -p n_per_question 5")
    b = sub.add_parser("bench", help="HF tokens/s per batch size (CPU), written as JSON")
    b.add_argument("--max-new-tokens", type=int, default=64)
    b.add_argument("--batch-sizes", default="1,8,32")
    b.add_argument("--out", default="build/bench/sample.json")
    args = parser.parse_args(argv)
    from emlab.logs import setup_logging

    setup_logging(logging.INFO)
    if args.command == "bench":
        res = bench_sample([int(x) for x in args.batch_sizes.split(",")], args.max_new_tokens)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=2))
        print(json.dumps(res, indent=2))
        return 0
    from emlab.data import DataError, load_questions
    from emlab.models import loaded

    overrides = {key: cli_value(value) for key, value in args.p}
    try:
        cfg = load(SampleConfig, args.profile, overrides)
        spec = cfg.model or ModelSpec(**read_profile(args.profile)["common"]["model"])
        questions = load_questions(args.questions)
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    run = Path(args.run) if args.run else None
    with loaded(spec, run) as (model, tok):
        df = sample(model, tok, questions, cfg, adapter=run.name if run else None, out=args.out, model_name=spec.name)
    print(f"{len(df)} answers in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
