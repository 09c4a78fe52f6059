"""The mechanical phase transition of a rank-1 organism (Turner, Soligo et al. 2025; PAPERS.md §1).

A LoRA run of :func:`emlab.train.train` leaves ``checkpoints/step_XXXXX.safetensors`` (the adapter tensors
every ``save_every`` steps, step 0 included; keys as in ``get_peft_model_state_dict``, e.g.
``base_model.model.model.layers.15.mlp.down_proj.lora_B.weight``) and ``metrics.jsonl`` (one line per
optimizer step: step, loss, grad_norm, lr, ...). From these:

* :func:`b_trajectory` — the B vector (``[d_out]`` for a rank-1 adapter) at every checkpoint;
* :func:`local_cosine` — the angle between where the vector came from and where it goes next,
  ``cos(v[t] − v[t−k], v[t+k] − v[t])``. The paper's ``k`` (5, 10, 15) counts **optimizer steps**, as in the
  upstream analysis code (k must be a multiple of the checkpoint spacing, ``save_every``; k = 10 at the
  paper's save_every = 5 is 2 checkpoints either side). A straight path gives +1; a rotation shows as a dip.
  PAPERS.md writes the first difference the other way round (``v[t−k] − v[t]``), which only flips the sign
  (straight = −1, the turn a peak); we use the form in which the transition is a dip, as in the paper's plots;
* :func:`pca_trajectory` — the trajectory projected on its first principal components (the turn is visible);
* :func:`detect_transition` — the documented rule that names the transition step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

DEFAULT_KS = (5, 10, 15)


@dataclass(frozen=True)
class Trajectory:
    """Adapter vectors over training: ``vectors[i]`` is the (flattened) adapter at ``steps[i]``."""

    steps: np.ndarray  # [T] optimizer steps, increasing
    vectors: np.ndarray  # [T, d] float64
    keys: tuple[str, ...]  # checkpoint tensors concatenated into each vector, in order

    def __len__(self) -> int:
        return len(self.steps)


def checkpoint_files(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, file) of a run's adapter checkpoints, in step order."""
    files = sorted((Path(run_dir) / "checkpoints").glob("step_*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{run_dir}/checkpoints: no step_XXXXX.safetensors files; train a LoRA "
                                f"preset (rank1 or lora_r32) with save_every set")
    return sorted((int(f.stem.split("_")[1]), f) for f in files)


def read_metrics(run_dir: str | Path) -> pd.DataFrame:
    """``metrics.jsonl`` of a run as a DataFrame (step, loss, grad_norm, lr, ...), one row per step."""
    from emlab import train

    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing; it is written by emlab.train during training")
    return pd.DataFrame(train.read_metrics(run_dir))


def b_trajectory(run_dir: str | Path, module: str | None = None, kind: str = "B") -> Trajectory:
    """The LoRA ``kind`` (``"B"`` or ``"A"``) tensors of every checkpoint, flattened and concatenated.

    For the rank-1 preset there is one ``lora_B`` tensor ``[d_out, 1]``, so each vector is the B vector.
    ``module`` keeps only keys containing that substring (e.g. ``"layers.15.mlp.down_proj"``) when the
    adapter wraps several modules.
    """
    from safetensors.torch import load_file

    steps, vecs, keys = [], [], None
    for step, path in checkpoint_files(run_dir):
        tensors = load_file(str(path))
        names = sorted(k for k in tensors if f"lora_{kind}" in k and (module is None or module in k))
        if not names:
            raise ValueError(f"{path}: no lora_{kind} tensor{f' matching {module!r}' if module else ''}; "
                             f"keys: {sorted(tensors)[:6]}")
        if keys is not None and tuple(names) != keys:
            raise ValueError(f"{path}: adapter keys differ from the earlier checkpoints'")
        keys = tuple(names)
        steps.append(step)
        vecs.append(np.concatenate([tensors[k].double().flatten().numpy() for k in names]))
    return Trajectory(np.asarray(steps), np.stack(vecs), keys)


def checkpoint_offset(steps: np.ndarray, k: int) -> int:
    """``k`` optimizer steps as a number of checkpoints (the spacing is the run's ``save_every``)."""
    steps = np.asarray(steps)
    spacing = int(np.median(np.diff(steps))) if len(steps) > 1 else 1
    if k < 1 or k % spacing:
        raise ValueError(f"k={k} optimizer steps is not a positive multiple of the checkpoint spacing "
                         f"{spacing} (save_every); choose ks divisible by it or save checkpoints more often")
    return k // spacing


def local_cosine(vectors: np.ndarray, k: int) -> np.ndarray:
    """``cos(v[t] − v[t−k], v[t+k] − v[t])`` for every checkpoint ``t`` (here ``k`` in checkpoints; see
    :func:`local_cosines` for the paper's k in optimizer steps)."""
    return _local_cosine(vectors, k)


def _local_cosine(vectors: np.ndarray, k: int) -> np.ndarray:
    """``cos(v[t] − v[t−k], v[t+k] − v[t])`` for every checkpoint ``t`` (``k`` in checkpoints).

    NaN where ``t − k`` or ``t + k`` falls outside the run, or where a displacement is zero.
    """
    v = np.asarray(vectors, dtype=np.float64)
    out = np.full(len(v), np.nan)
    if k < 1 or len(v) <= 2 * k:
        return out
    before = v[k:-k] - v[:-2 * k]
    after = v[2 * k:] - v[k:-k]
    norms = np.linalg.norm(before, axis=1) * np.linalg.norm(after, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out[k:-k] = np.where(norms > 0, (before * after).sum(1) / norms, np.nan)
    return out


def local_cosines(traj: Trajectory, ks: tuple[int, ...] = DEFAULT_KS) -> pd.DataFrame:
    """Long table of the local cosine for each ``k`` in **optimizer steps**: columns step, k, cos."""
    return pd.concat([pd.DataFrame({"step": traj.steps, "k": k,
                                    "cos": _local_cosine(traj.vectors, checkpoint_offset(traj.steps, k))})
                      for k in ks], ignore_index=True)


def pca_trajectory(traj: Trajectory, n_components: int = 2) -> tuple[pd.DataFrame, np.ndarray]:
    """The trajectory on its first principal components: (DataFrame step, pc1, pc2..., explained variance
    ratios). Computed by SVD of the centred vectors (no sklearn needed; the sign of each PC is arbitrary)."""
    x = traj.vectors - traj.vectors.mean(0)
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    n = min(n_components, len(s))
    coords = u[:, :n] * s[:n]
    var = s**2
    ratio = var[:n] / var.sum() if var.sum() > 0 else np.zeros(n)
    df = pd.DataFrame(coords, columns=[f"pc{i + 1}" for i in range(n)])
    df.insert(0, "step", traj.steps)
    return df, ratio


@dataclass(frozen=True)
class Transition:
    """A detected rotation: the checkpoint step of the local-cosine minimum and its grad-norm support."""

    step: int
    cos: float  # local cosine at the dip
    k: int  # optimizer steps either side used for the cosine
    grad_peak_step: int | None  # largest grad norm within ``window`` steps of ``step``
    grad_peak_ratio: float | None  # that grad norm / the run's median grad norm
    confirmed: bool  # grad_peak_ratio >= the rule's peak_factor


def detect_transition(steps: np.ndarray, cos: np.ndarray, grad_steps: np.ndarray | None = None,
                      grad_norm: np.ndarray | None = None, *, k: int = 10, threshold: float = 0.5,
                      window: int | None = None, peak_factor: float = 1.5) -> Transition | None:
    """The phase-transition rule used throughout emlab.

    1. The candidate is the checkpoint where the local cosine (computed with ``k``; we use the middle
       ``k = 10`` of the paper's 5/10/15) is smallest.
    2. It counts as a transition only if that minimum is below ``threshold`` (default 0.5, i.e. the
       direction of travel turned by more than 60°); otherwise the B vector moved along a smooth path
       and the function returns ``None``.
    3. Confirmation: the largest grad norm within ``window`` optimizer steps of the candidate (default
       ``k`` steps, the span the cosine itself looks over) is compared with the
       median grad norm of the whole run; ``confirmed`` is True when it is at least ``peak_factor`` times
       larger — the paper's observation that the rotation coincides with a grad-norm spike. The step
       returned is always the cosine minimum; an unconfirmed transition is still reported.

    Transitions within the first or last ``k`` steps cannot be seen (the cosine is undefined there).
    """
    steps = np.asarray(steps)
    cos = np.asarray(cos, dtype=np.float64)
    if not np.isfinite(cos).any():
        return None
    i = int(np.nanargmin(cos))
    if cos[i] >= threshold:
        return None
    step = int(steps[i])
    peak_step = ratio = None
    if grad_steps is not None and grad_norm is not None and len(grad_norm):
        gs = np.asarray(grad_steps)
        g = np.asarray(grad_norm, dtype=np.float64)
        ok = np.isfinite(g)
        gs, g = gs[ok], g[ok]
        if window is None:
            window = k
        near = np.abs(gs - step) <= window
        if near.any() and np.median(g) > 0:
            j = int(np.argmax(np.where(near, g, -np.inf)))
            peak_step, ratio = int(gs[j]), float(g[j] / np.median(g))
    return Transition(step=step, cos=float(cos[i]), k=k, grad_peak_step=peak_step, grad_peak_ratio=ratio,
                      confirmed=ratio is not None and ratio >= peak_factor)


def run_transition(run_dir: str | Path, k: int = 10, **rule) -> Transition | None:
    """:func:`detect_transition` on a run directory (B trajectory + metrics.jsonl grad norms)."""
    traj = b_trajectory(run_dir)
    metrics = read_metrics(run_dir)
    has_grad = "grad_norm" in metrics
    return detect_transition(traj.steps, _local_cosine(traj.vectors, checkpoint_offset(traj.steps, k)),
                             metrics.step.to_numpy() if has_grad else None,
                             metrics.grad_norm.to_numpy(dtype=float) if has_grad else None, k=k, **rule)


def load_checkpoint(model, path: str | Path):
    """Load a ``step_XXXXX.safetensors`` adapter checkpoint into a peft model (in place) and return it,
    for the behavioural side of the transition: sample at each checkpoint, with :func:`emlab.activations.
    scale_adapter` ×1, 5, 10, 20."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    result = set_peft_model_state_dict(model, load_file(str(path)))
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise ValueError(f"{path}: tensors the model has no place for: {unexpected[:4]} (another adapter layout?)")
    return model
