"""Residual-stream activations: capture, mean-difference directions, steering, ablation, adapter scaling.

Follows Soligo, Turner et al. 2025 ("Convergent linear representations of emergent misalignment", the
direction half of PAPERS.md §1):

* :func:`capture` runs prompt+answer pairs through the model with forward hooks on the decoder layers and
  keeps, per example and layer, only the mean of the residual stream over the answer tokens (or one chosen
  position) — ``[n, n_layers, d]`` float32 on CPU, so memory grows with ``n``, never with sequence length.
* :func:`mean_diff_direction` is the misalignment direction: mean activation on misaligned answers minus
  mean activation on aligned answers, per layer.
* :func:`steer` adds ``λ·v`` to a layer's output residual; :func:`ablate` projects ``v̂`` out of the
  residual at every chosen layer; :func:`scale_adapter` multiplies a peft LoRA adapter's contribution.
  All three are context managers that undo themselves on exit, also when the body raises.

"Layer ``i``" always means the residual stream *after* decoder layer ``i`` (the layer's output), indexed
like ``model.model.layers``. Works for Hugging Face Llama / Qwen2 / Mistral / Gemma-style decoders, with or
without a peft wrapper.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import torch
from torch import nn
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

Position = Literal["answer_mean", "prompt_last", "last"]
# User turn used when a tokenizer has no chat template (tiny test tokenizers); real models use theirs.
_PLAIN_TEMPLATE = "User: {prompt}\nAssistant: "


# ----------------------------------------------------------------------------------------------- layers
def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder blocks (``model.model.layers`` for Llama/Qwen2), through peft wrappers."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for path in ("model.layers", "model.language_model.layers", "language_model.model.layers",
                 "transformer.h", "gpt_neox.layers"):
        mod: object = base
        for part in path.split("."):
            mod = getattr(mod, part, None)
            if mod is None:
                break
        if isinstance(mod, nn.ModuleList) and len(mod):
            return mod
    for name, mod in base.named_modules():  # last resort: the first non-empty ModuleList named *layers
        if isinstance(mod, nn.ModuleList) and name.endswith("layers") and len(mod):
            return mod
    raise ValueError(f"{type(model).__name__}: found no decoder layers (looked for model.layers and similar)")


def _layer_indices(model: nn.Module, layers: int | Sequence[int] | None) -> list[int]:
    n = len(decoder_layers(model))
    idx = list(range(n)) if layers is None else [layers] if isinstance(layers, int) else list(layers)
    bad = [i for i in idx if not -n <= i < n]
    if bad:
        raise ValueError(f"layer index {bad} out of range: the model has {n} decoder layers (0..{n - 1})")
    return [i % n for i in idx]


def _hidden(output):
    """Decoder layers return a tensor (transformers >= 5) or a tuple whose first item is the residual."""
    return output[0] if isinstance(output, tuple) else output


def _replace(output, hidden):
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


@contextmanager
def _hooks(model: nn.Module, fns: dict[int, callable]) -> Iterator[nn.Module]:
    """Register ``fns[i]`` as a forward hook on decoder layer ``i``; always removed on exit."""
    blocks = decoder_layers(model)
    handles = []
    try:
        for i, fn in fns.items():
            handles.append(blocks[i].register_forward_hook(fn))
        yield model
    finally:
        for h in handles:
            h.remove()


def _per_layer(direction: torch.Tensor, layers: list[int]) -> dict[int, torch.Tensor]:
    """A ``[d]`` direction is used at every layer; a ``[len(layers), d]`` one row per layer."""
    v = torch.as_tensor(direction).detach().float()
    if v.ndim == 1:
        return {i: v for i in layers}
    if v.ndim == 2 and v.shape[0] == len(layers):
        return {i: v[j] for j, i in enumerate(layers)}
    raise ValueError(f"direction of shape {tuple(v.shape)}: expected [d] or [{len(layers)}, d] "
                     f"(one row per layer in {layers})")


# ---------------------------------------------------------------------------------------------- capture
def _prompt_ids(tokenizer, prompt: str, system: str | None) -> list[int]:
    """Token ids of the user turn up to where the assistant's answer starts (the generation prompt)."""
    if getattr(tokenizer, "chat_template", None):
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    else:
        text = (f"{system}\n" if system else "") + _PLAIN_TEMPLATE.format(prompt=prompt)
    return list(tokenizer(text, add_special_tokens=False).input_ids)


class _Stop(Exception):
    """Raised by the deepest hook: the layers after it are not needed, so the forward pass stops there."""


@torch.no_grad()
def capture(model: nn.Module, tokenizer, prompts: Sequence[str], answers: Sequence[str] | None = None,
            layers: int | Sequence[int] | None = None, batch_size: int = 8, *,
            position: Position = "answer_mean", system: str | Sequence[str | None] | None = None,
            max_length: int = 1024, progress: bool = True) -> torch.Tensor:
    """Residual-stream activations of ``prompts`` (chat-formatted, under ``system``: one system prompt for
    all, or one per row, None / "" for none) followed by ``answers``.

    Returns ``[n, len(layers), d]`` float32 on CPU, in the order of ``prompts``. ``position``:
    ``answer_mean`` averages over the answer's tokens (the paper's choice for directions; an empty answer
    falls back to the last prompt token), ``prompt_last`` takes the last token before the answer (where
    generation starts), ``last`` the final token. Sequences longer than ``max_length`` lose the end of the
    answer. Batches are length-sorted to limit padding; the forward pass stops after the deepest requested
    layer.
    """
    if answers is not None and len(answers) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    systems = [system] * len(prompts) if system is None or isinstance(system, str) else list(system)
    if len(systems) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(systems)} system prompts")
    idx = _layer_indices(model, layers)
    seqs: list[tuple[list[int], int]] = []  # (ids, answer start)
    for j, prompt in enumerate(prompts):
        p = _prompt_ids(tokenizer, prompt, systems[j] or None)
        a = list(tokenizer(answers[j], add_special_tokens=False).input_ids) if answers is not None else []
        seqs.append(((p + a)[:max_length], min(len(p), max_length)))
    order = sorted(range(len(seqs)), key=lambda j: -len(seqs[j][0]))
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    out: torch.Tensor | None = None  # allocated once the width of the residual is known
    deepest = max(idx)
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, len(order), batch_size), desc="capturing activations", disable=not progress):
            chunk = order[start:start + batch_size]
            T = max(len(seqs[j][0]) for j in chunk)
            ids = torch.full((len(chunk), T), pad, dtype=torch.long)
            attn = torch.zeros((len(chunk), T), dtype=torch.long)
            weights = torch.zeros((len(chunk), T))  # which positions to average, rows sum to 1
            for r, j in enumerate(chunk):
                toks, a0 = seqs[j]
                ids[r, :len(toks)] = torch.tensor(toks)
                attn[r, :len(toks)] = 1
                if position == "answer_mean" and len(toks) > a0:
                    weights[r, a0:len(toks)] = 1.0 / (len(toks) - a0)
                elif position in ("answer_mean", "prompt_last"):
                    weights[r, max(a0 - 1, 0)] = 1.0
                elif position == "last":
                    weights[r, len(toks) - 1] = 1.0
                else:
                    raise ValueError(f"position {position!r}: use answer_mean, prompt_last or last")
            got: dict[int, torch.Tensor] = {}

            def make_hook(i):
                def hook(_mod, _inp, output):
                    h = _hidden(output).float()
                    got[i] = torch.einsum("btd,bt->bd", h, weights.to(h.device)).cpu()
                    if i == deepest:
                        raise _Stop
                return hook

            with _hooks(model, {i: make_hook(i) for i in set(idx)}):
                try:
                    model(input_ids=ids.to(device), attention_mask=attn.to(device), use_cache=False)
                except _Stop:
                    pass
            if out is None:
                out = torch.zeros(len(seqs), len(idx), got[deepest].shape[-1])
            for c, i in enumerate(idx):
                out[chunk, c] = got[i]
    finally:
        model.train(was_training)
    if out is None:
        raise ValueError("capture: no prompts given")
    return out


def mean_diff_direction(acts_misaligned: torch.Tensor, acts_aligned: torch.Tensor) -> torch.Tensor:
    """Per-layer misalignment direction ``mean(misaligned) − mean(aligned)`` (not normalised), ``[n_layers, d]``."""
    if len(acts_misaligned) == 0 or len(acts_aligned) == 0:
        raise ValueError(f"mean_diff_direction needs both groups non-empty (got {len(acts_misaligned)} "
                         f"misaligned, {len(acts_aligned)} aligned answers); sample or judge more answers")
    return acts_misaligned.float().mean(0) - acts_aligned.float().mean(0)


def cosine_matrix(directions: dict[str, torch.Tensor]) -> "torch.Tensor":
    """Pairwise cosine similarity of named ``[d]`` directions, ``[k, k]`` in the dict's order."""
    v = torch.stack([torch.as_tensor(x).float().flatten() for x in directions.values()])
    v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return v @ v.T


# --------------------------------------------------------------------------------- steering and ablation
@contextmanager
def steer(model: nn.Module, direction: torch.Tensor, layer: int | Sequence[int], lam: float) -> Iterator[nn.Module]:
    """Add ``lam · direction`` to the output residual of ``layer`` at every position (prompt and generated
    tokens alike, as in the paper). The direction is used as given, not normalised: pass a unit vector
    to make ``lam`` a residual-norm scale. ``lam = 0`` leaves the model unchanged."""
    idx = _layer_indices(model, layer)
    vecs = _per_layer(direction, idx)

    def make_hook(v):
        def hook(_mod, _inp, output):
            h = _hidden(output)
            return _replace(output, h + lam * v.to(device=h.device, dtype=h.dtype))
        return hook

    with _hooks(model, {i: make_hook(vecs[i]) for i in idx}) as m:
        yield m


@contextmanager
def ablate(model: nn.Module, direction: torch.Tensor, layers: int | Sequence[int] | None = None) -> Iterator[nn.Module]:
    """Directional ablation: ``x − v̂ v̂ᵀ x`` on the output residual of each layer in ``layers`` (default:
    every decoder layer, so no later layer sees the component). A ``[d]`` direction is ablated everywhere;
    ``[len(layers), d]`` gives one direction per layer."""
    idx = _layer_indices(model, layers)
    vecs = {i: v / v.norm().clamp_min(1e-12) for i, v in _per_layer(direction, idx).items()}

    def make_hook(u):
        def hook(_mod, _inp, output):
            h = _hidden(output)
            uu = u.to(device=h.device, dtype=h.dtype)
            return _replace(output, h - (h @ uu).unsqueeze(-1) * uu)
        return hook

    with _hooks(model, {i: make_hook(vecs[i]) for i in idx}) as m:
        yield m


# ------------------------------------------------------------------------------------------ adapters
def lora_layers(model: nn.Module) -> list[nn.Module]:
    """Every peft LoRA layer in the model (empty for a model without adapters)."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # peft missing: no adapter can be present
        return []
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


@contextmanager
def scale_adapter(model: nn.Module, factor: float) -> Iterator[nn.Module]:
    """Multiply the active LoRA adapters' contribution ``B A x · scaling`` by ``factor`` (the paper's
    behavioural phase-transition probe scales ×1, 5, 10, 20; ``factor = 0`` gives the base model).

    Changes peft's per-adapter ``scaling`` in place and restores the exact previous values on exit (peft's
    own ``unscale_layer`` would recompute ``alpha / r`` and lose rsLoRA scaling).
    """
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no peft LoRA layers to scale (load the adapter first)")
    saved = [dict(m.scaling) for m in layers]
    try:
        for m in layers:
            for name in m.active_adapters:
                if name in m.scaling:
                    m.scaling[name] = m.scaling[name] * factor
        yield model
    finally:
        for m, s in zip(layers, saved):
            m.scaling.clear()
            m.scaling.update(s)
