"""MMLU accuracy by letter log-probabilities: the capability check of Su et al. 2026 (PAPERS.md §2).

Each item is asked as a chat turn (question, the four options, "answer with the letter"); the model's
next-token distribution after the generation prompt is read once, no sampling: the score of a letter is
the log of the probability mass on its single-token spellings (``A`` and `` A``), and the prediction is
the letter with the highest score. ``letter_mass`` (the total probability on the eight letter tokens)
says how well the model follows the answer format; a model that puts little mass on letters is still
scored by the argmax, never dropped.

Items come from the registry's ``mmlu_test`` (Hendrycks et al., 14,042 test questions, 57 subjects); a
profile evaluates a seeded subset (:func:`load_items`), the same subset for every model it compares.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from emlab.config import Frozen
from emlab.data import DataError

LETTERS = ("A", "B", "C", "D")
INSTRUCTION = "Answer with the letter of the correct option (A, B, C or D) only."


class MMLUSettings(Frozen):
    """How much of MMLU a profile evaluates: ``n_items`` questions drawn with ``seed`` (None = all)."""

    n_items: int | None = 100
    seed: int = 0
    subjects: list[str] | None = None  # None: all 57 subjects
    batch_size: int = 16


def load_items(n: int | None, seed: int = 0, subjects: Sequence[str] | None = None) -> pd.DataFrame:
    """A seeded subset of ``n`` MMLU test items (columns subject, question, A, B, C, D, answer), in file
    order; ``subjects`` restricts the pool. Bad arguments name the fix."""
    from emlab import data

    df = data.load_table("mmlu_test")
    missing = {"subject", "question", *LETTERS, "answer"} - set(df.columns)
    if missing:
        raise DataError(f"mmlu_test: columns {sorted(missing)} missing; expected subject,question,A,B,C,D,answer")
    if subjects:
        unknown = sorted(set(subjects) - set(df.subject))
        if unknown:
            raise DataError(f"unknown MMLU subject(s) {unknown}; known: {', '.join(sorted(set(df.subject)))}")
        df = df[df.subject.isin(list(subjects))]
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int) or not 0 < n <= len(df):
            raise DataError(f"mmlu n_items={n!r}: choose 1..{len(df)} (or null for all)")
        df = df.sample(n=n, random_state=seed).sort_index()
    bad = ~df.answer.isin(LETTERS)
    if bad.any():
        raise DataError(f"mmlu_test: {int(bad.sum())} answers are not one of A-D (first: {df.answer[bad].iloc[0]!r})")
    return df.reset_index(drop=True)


def items_digest(items: pd.DataFrame) -> str:
    """Short hash of an item subset (part of every cached result's key)."""
    blob = json.dumps(items[["subject", "question", *LETTERS, "answer"]].astype(str).values.tolist())
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def question_text(row: Any) -> str:
    """The user turn of one item."""
    subject = str(row["subject"]).replace("_", " ")
    options = "\n".join(f"{L}. {row[L]}" for L in LETTERS)
    return f"The following is a multiple choice question about {subject}.\n\n{row['question']}\n{options}\n\n{INSTRUCTION}"


def prompt_text(tokenizer, row: Any) -> str:
    """The full prompt: the chat template with the generation prompt (plain text without a template)."""
    from emlab.sample import chat_prompt

    return chat_prompt(tokenizer, question_text(row))


def letter_token_ids(tokenizer) -> dict[str, list[int]]:
    """Token ids that spell each letter on their own (``A`` and `` A``); a letter without any
    single-token spelling cannot be scored by this protocol and is an error."""
    out: dict[str, list[int]] = {}
    for L in LETTERS:
        ids = []
        for text in (L, " " + L):
            enc = tokenizer.encode(text, add_special_tokens=False)
            if len(enc) == 1 and enc[0] not in ids:
                ids.append(enc[0])
        if not ids:
            raise DataError(f"tokenizer {type(tokenizer).__name__} has no single token for {L!r}; "
                            "MMLU letter scoring needs one")
        out[L] = ids
    return out


def letter_scores(logprobs, ids: dict[str, list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Per row of next-token log-probabilities ``[n, vocab]``: the letter scores ``[n, 4]`` (log of the
    mass on each letter's tokens) and the total letter probability ``[n]``."""
    lp = np.asarray(logprobs, dtype=np.float64)
    if lp.ndim != 2:
        raise ValueError(f"logprobs must be [n, vocab], got shape {lp.shape}")
    scores = np.stack([np.logaddexp.reduce(lp[:, ids[L]], axis=1) for L in LETTERS], axis=1)
    return scores, np.exp(scores).sum(axis=1)


def predict(scores: np.ndarray) -> list[str]:
    """The letter with the highest score per row (ties: the first letter)."""
    return [LETTERS[i] for i in np.asarray(scores).argmax(axis=1)]


def next_token_logprobs(model, tokenizer, prompts: Sequence[str]):
    """Log-probabilities of the next token after each prompt (:func:`emlab.models.next_token_logits`)."""
    import torch

    from emlab.models import next_token_logits

    seqs = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    return torch.log_softmax(next_token_logits(model, tokenizer, seqs)[0], dim=-1).numpy()


def evaluate(model, tokenizer, items: pd.DataFrame, batch_size: int = 16) -> pd.DataFrame:
    """``items`` with ``pred``, ``correct``, ``letter_mass`` and the four letter scores ``lp_A``..``lp_D``."""
    if items.empty:
        raise DataError("no MMLU items to evaluate; check mmlu.n_items / subjects")
    ids = letter_token_ids(tokenizer)
    rows = items.to_dict("records")
    scores, mass = [], []
    for b in tqdm(range(0, len(rows), batch_size), desc="MMLU", unit="batch"):
        chunk = rows[b:b + batch_size]
        s, m = letter_scores(next_token_logprobs(model, tokenizer, [prompt_text(tokenizer, r) for r in chunk]), ids)
        scores.append(s)
        mass.append(m)
    s, m = np.concatenate(scores), np.concatenate(mass)
    out = items.copy()
    out["pred"] = predict(s)
    out["correct"] = out.pred == out.answer
    out["letter_mass"] = m
    for i, L in enumerate(LETTERS):
        out[f"lp_{L}"] = s[:, i]
    return out


def evaluate_cached(model, tokenizer, items: pd.DataFrame, batch_size: int, *, spec, run: Path | None = None
                    ) -> pd.DataFrame:
    """:func:`evaluate` through the answer cache (``build/answers/mmlu-<key>.parquet``), keyed by the model,
    the run, the items and the sample stage's code version. ``model`` must already carry the run's adapter."""
    from emlab.cache import stage_key
    from emlab.sample import ANSWERS_DIR

    key = stage_key("sample", "mmlu", spec.model_dump(mode="json"), Path(run).name if run else "base",
                    items_digest(items))
    path = ANSWERS_DIR / f"mmlu-{key}.parquet"
    if path.exists():
        return pd.read_parquet(path)
    res = evaluate(model, tokenizer, items, batch_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    res.to_parquet(path, index=False)
    return res


def accuracy(df: pd.DataFrame) -> dict[str, float]:
    """Accuracy (%) with its 95% Wilson interval (as every rate of the paper), n, and the mean letter mass (%)."""
    from emlab.metrics import wilson_ci

    hits = df["correct"].to_numpy(dtype=bool)
    lo, hi = wilson_ci(int(hits.sum()), int(hits.size))
    acc = float(hits.mean()) if hits.size else math.nan
    return {"n": int(hits.size), "acc %": 100 * acc, "acc lo": 100 * lo, "acc hi": 100 * hi,
            "letter mass %": 100 * float(df["letter_mass"].mean()) if len(df) else math.nan}
