"""The SLURM path through submitit's own local executors: a training sweep and a notebook run as jobs."""

import operator

import pytest

from emlab import launch
from emlab.config import ConfigError


def test_submit_runs_here_or_as_a_job(tmp_path):
    assert launch.submit(operator.mul, 3, 3) == 9
    assert launch.submit(operator.mul, 4, 4, launcher="debug", folder=tmp_path) == 16
    assert launch.submit(operator.mul, 5, 5, launcher="submitit-local", folder=tmp_path) == 25  # a subprocess job
    assert list(tmp_path.glob("*_log.out")), "submitit wrote no job logs"


def test_unknown_launcher_is_refused():
    with pytest.raises(ConfigError, match="launcher 'pbs'"):
        launch.parameters("pbs", "x")


def test_slurm_settings_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("EMLAB_SLURM_PARTITION", "gpu-long")
    monkeypatch.setenv("EMLAB_SLURM_GPUS", "2")
    params = launch.parameters("slurm", "sweep")
    assert params["slurm_partition"] == "gpu-long" and params["gpus_per_node"] == 2
    # submitit's local executor hides every GPU unless gpus_per_node is set (a local job on an H200
    # saw no CUDA device before this); it takes the same setting
    assert launch.parameters("submitit-local", "x")["gpus_per_node"] == 2
    monkeypatch.delenv("EMLAB_SLURM_GPUS")
    assert launch.parameters("submitit-local", "x")["gpus_per_node"] == 1
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")  # the user's choice survives: not silently GPU 0
    assert launch.parameters("submitit-local", "x")["visible_gpus"] == [3]
    assert "visible_gpus" not in launch.parameters("slurm", "x")


@pytest.mark.slow
def test_sweep_trains_organisms_as_a_job_array(tiny_spec, tmp_path):
    from emlab import config
    from emlab.train import TrainConfig

    base = dict(model=tiny_spec.model_dump(), n_examples=4, grad_accum=1, max_length=96,
                output_root=str(tmp_path / "runs"))
    cfgs = [config.load(TrainConfig, "smoke", {**base, "seed": s}) for s in (0, 1)]
    runs = launch.sweep(cfgs, launcher="submitit-local", folder=tmp_path / "jobs")
    assert len({str(r) for r in runs}) == 2 and all((r / "manifest.json").exists() for r in runs)
    assert launch.sweep(cfgs[:1]) == runs[:1]  # finished runs are reused, not retrained
