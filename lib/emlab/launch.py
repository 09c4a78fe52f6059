"""Where work runs: here (``local``, the default) or as SLURM jobs through submitit (``slurm``).

``make all LAUNCHER=slurm`` submits each notebook as one job and waits for it (run Make with ``-j`` to
let independent notebooks run side by side); :func:`sweep` trains many organisms (organisms x seeds) as
one job array. ``debug`` runs the job in this process and ``submitit-local`` in a local subprocess,
both through submitit's own executors, which is how the tests check the SLURM path without a cluster.

Cluster settings come from the environment, so profiles stay machine-independent:
``EMLAB_SLURM_PARTITION``, ``EMLAB_SLURM_GPUS`` (per job, default 1), ``EMLAB_SLURM_TIMEOUT_MIN``
(default 720), ``EMLAB_SLURM_CPUS`` (default 8), ``EMLAB_SLURM_MEM_GB`` (default 64).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Sequence

from emlab.config import ConfigError

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
LAUNCHERS = ("local", "slurm", "submitit-local", "debug")


def parameters(launcher: str, name: str) -> dict[str, Any]:
    """submitit parameters of a job: name, timeout and, on SLURM, resources from the environment."""
    if launcher not in LAUNCHERS or launcher == "local":
        raise ConfigError(f"launcher {launcher!r}: use one of {', '.join(LAUNCHERS[1:])} here "
                          f"(local runs need no executor)")
    env = os.environ.get
    params: dict[str, Any] = {"name": f"emlab-{name}", "timeout_min": int(env("EMLAB_SLURM_TIMEOUT_MIN", 720))}
    # submitit's local executor sets CUDA_VISIBLE_DEVICES from gpus_per_node (default 0: no GPU at all),
    # counting from GPU 0 unless told which GPUs the user made visible
    params["gpus_per_node"] = int(env("EMLAB_SLURM_GPUS", 1))
    visible = env("CUDA_VISIBLE_DEVICES", "")
    if launcher != "slurm" and visible and all(v.strip().isdigit() for v in visible.split(",")):
        params["visible_gpus"] = [int(v) for v in visible.split(",")]
        params["gpus_per_node"] = min(params["gpus_per_node"], len(params["visible_gpus"]))
    if launcher == "slurm":
        params.update(cpus_per_task=int(env("EMLAB_SLURM_CPUS", 8)), mem_gb=int(env("EMLAB_SLURM_MEM_GB", 64)))
        if env("EMLAB_SLURM_PARTITION"):
            params["slurm_partition"] = env("EMLAB_SLURM_PARTITION")
    return params


def executor(launcher: str, name: str, folder: Path | None = None):
    """A submitit executor for ``launcher`` (not ``local``); job logs go to build/jobs/<job id>/."""
    import submitit

    params = parameters(launcher, name)
    cluster = {"slurm": "slurm", "submitit-local": "local", "debug": "debug"}[launcher]
    ex = submitit.AutoExecutor(folder=str(folder or ROOT / "build" / "jobs" / "%j"), cluster=cluster)
    ex.update_parameters(**params)
    return ex


def submit(fn: Callable, *args, launcher: str = "local", name: str = "job", folder: Path | None = None, **kwargs):
    """``fn(*args, **kwargs)`` here, or as one job that this call waits for; returns its result."""
    if launcher == "local":
        return fn(*args, **kwargs)
    job = executor(launcher, name, folder).submit(fn, *args, **kwargs)
    log.info("submitted %s as job %s (%s); waiting", name, job.job_id, launcher)
    return job.result()  # re-raises the job's exception with its traceback


def sweep(configs: Sequence[Any], launcher: str = "local", folder: Path | None = None) -> list[Path]:
    """Train every config (e.g. organisms x seeds): one by one here, or as a SLURM job array. Finished
    runs are reused by :func:`emlab.train.train`, so a re-submitted sweep only trains what is missing."""
    from emlab.train import train

    if launcher == "local":
        return [train(cfg) for cfg in configs]
    jobs = executor(launcher, "sweep", folder).map_array(train, list(configs))
    log.info("submitted %d training jobs (%s): %s", len(jobs), launcher, ", ".join(j.job_id for j in jobs))
    return [j.result() for j in jobs]
