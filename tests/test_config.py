"""emlab.config: profiles merge, frozen configs, unknown keys rejected with a helpful message."""

import pytest
import yaml
from pydantic import ValidationError

from emlab import config
from emlab.analysis import DatasetsConfig
from emlab.config import ConfigError, ModelSpec


@pytest.mark.parametrize("profile", config.PROFILES)
def test_every_profile_builds_every_section_config(profile):
    cfg = config.load(DatasetsConfig, profile)
    assert cfg.profile == profile
    assert isinstance(cfg.model, ModelSpec)


def test_profiles_pick_the_documented_models():
    assert config.load(DatasetsConfig, "smoke").model.source == "tiny"
    assert config.load(DatasetsConfig, "cpu").model.source == "embedded"
    gpu = config.load(DatasetsConfig, "gpu").model
    assert gpu.load_in_4bit and gpu.path.startswith("Qwen/Qwen2.5")


@pytest.mark.parametrize("profile", config.PROFILES)
def test_offline_profiles_judge_every_section_with_their_own_judge(profile):
    """02 builds and evaluates the profile's judge (judge_eval.build); every other section must judge with that
    one. laptop once judged §03 with cpu's smaller judge while its §02 described its own."""
    judges = {section: getattr(config.load(cls, profile), "judge", None) for section, cls in config.experiments().items()}
    offline = {s: j.model for s, j in judges.items() if j is not None and j.backend == "offline"}
    assert profile in ("gpu", "paper") or len(offline) >= 5, offline
    assert all(m == profile for m in offline.values()), offline


def test_default_profile_is_cpu_and_env_selects(monkeypatch):
    monkeypatch.delenv("PROFILE", raising=False)
    assert config.load(DatasetsConfig).profile == "cpu"
    monkeypatch.setenv("PROFILE", "smoke")
    assert config.load(DatasetsConfig).profile == "smoke"


def test_overrides_win_and_nested_merge():
    cfg = config.load(DatasetsConfig, "cpu", {"token_rows": 7, "model": {"dtype": "bfloat16"}})
    assert cfg.token_rows == 7
    assert cfg.model.dtype == "bfloat16" and cfg.model.source == "embedded"  # merged, not replaced


def test_unknown_key_names_it_and_the_allowed_ones():
    with pytest.raises(ConfigError) as err:
        config.load(DatasetsConfig, "cpu", {"token_row": 5})
    msg = str(err.value)
    assert "'token_row'" in msg and "token_rows" in msg and "allowed" in msg


def test_unknown_nested_key_lists_nested_allowed_keys():
    with pytest.raises(ConfigError) as err:
        config.load(DatasetsConfig, "cpu", {"model": {"quant": "nf4"}})
    assert "model.quant" in str(err.value) and "load_in_4bit" in str(err.value)


def test_wrong_type_is_reported_with_the_value():
    with pytest.raises(ConfigError, match="token_rows"):
        config.load(DatasetsConfig, "cpu", {"token_rows": "many"})


def test_unknown_profile():
    with pytest.raises(ConfigError, match="smoke, cpu, laptop, gpu, paper"):
        config.load(DatasetsConfig, "desktop")


def test_laptop_extends_cpu_and_trains_at_the_papers_budget():
    """laptop: the cpu profile's blocks, with §03's organisms on one epoch of the full data at the papers'
    learning rates (lr_scale 1), effective batch 16, a checkpoint every 10 steps."""
    from emlab import organisms
    from emlab.train import TrainConfig

    t = config.load(TrainConfig, "laptop")
    assert (t.n_examples, t.epochs, t.lr_scale, t.batch_size * t.grad_accum, t.save_every) == (None, 1.0, 1.0, 16, 10)
    assert config.load(DatasetsConfig, "laptop") == config.load(DatasetsConfig, "cpu").model_copy(update={"profile": "laptop"})
    grid = config.load(organisms.OrganismsConfig, "laptop")
    assert {o.name for o in grid.organisms} >= {"bad_medical_advice/rank1", "good_medical_advice/rank1"}
    assert grid.eval.samples_per_question == 50
    assert config.load(organisms.PhaseConfig, "laptop").organism.train == {}  # merge patch: null removed cpu's keys


def test_cpu_flagship_trains_a_third_of_an_epoch_and_every_section_shares_it():
    """cpu: rank-1 bad medical at the papers' recipe stopped after >= 1/3 of an epoch (441 steps), the same
    run in §03, §04, §05 and §10; the other organisms stay small."""
    from emlab import organisms, persona

    grid = config.load(organisms.OrganismsConfig, "cpu")
    flag = organisms.train_config(grid, grid.organisms[0])
    assert flag.n_examples is None and flag.batch_size * flag.grad_accum == 16 and flag.learning_rate == 2e-5
    assert flag.stop_at >= 441 / 3
    phase, dirs = config.load(organisms.PhaseConfig, "cpu"), config.load(organisms.DirectionsConfig, "cpu")
    cons = config.load(persona.PersonaConsistencyConfig, "cpu")
    assert {organisms.train_config(phase, phase.organism).run_digest(),
            organisms.train_config(dirs, dirs.organisms[0]).run_digest(),
            persona.train_config(cons, cons.organisms[0]).run_digest()} == {flag.run_digest()}
    assert all(organisms.train_config(grid, o).n_examples == 64 for o in grid.organisms[1:])


def test_a_profile_cannot_extend_itself(tmp_path, monkeypatch):
    (tmp_path / "loop.yaml").write_text("extends: loop\n")
    monkeypatch.setattr(config, "PROFILE_DIR", tmp_path)
    monkeypatch.setattr(config, "PROFILES", (*config.PROFILES, "loop"))
    with pytest.raises(ConfigError, match="extends 'loop', which is not another profile"):
        config.read_profile("loop")


def test_configs_are_frozen_and_hash_stably():
    cfg = config.load(DatasetsConfig, "cpu")
    with pytest.raises(ValidationError):
        cfg.token_rows = 3
    assert cfg.digest() == config.load(DatasetsConfig, "cpu").digest()
    assert cfg.digest() != config.load(DatasetsConfig, "cpu", {"token_rows": 3}).digest()


def test_yaml_round_trip_and_bad_file(tmp_path):
    cfg = config.load(DatasetsConfig, "smoke", {"token_rows": 3})
    path = tmp_path / "run.yaml"
    path.write_text(config.to_yaml(cfg))
    assert config.from_yaml(DatasetsConfig, path) == cfg
    path.write_text("profile: smoke\ntoken_rowz: 3\n")
    with pytest.raises(ConfigError, match=str(path)):
        config.from_yaml(DatasetsConfig, path)
    with pytest.raises(ConfigError, match="no such config file"):
        config.from_yaml(DatasetsConfig, tmp_path / "missing.yaml")


def test_pins_agree_across_pyproject_environment_and_lock():
    """One set of pins: environment.yml lists pyproject's (runtime + dev) pins, the lock pins the same
    versions and every transitive package, and nothing is left unpinned."""
    from emlab.lockfile import ROOT as root
    from emlab.lockfile import pins

    pins = pins()
    assert all("==" in p for p in pins), [p for p in pins if "==" not in p]
    env = yaml.safe_load((root / "environment.yml").read_text())
    pip_deps = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert sorted(p for p in pip_deps if p != "-e .") == sorted(pins)
    lock = dict(line.split("==") for line in (root / "requirements.lock").read_text().splitlines()
                if line and not line.startswith("#"))
    norm = {k.lower().replace("_", "-"): v for k, v in lock.items()}
    for p in pins:
        name, version = p.split("==")
        assert norm.get(name.lower().replace("_", "-")) == version, p


def test_gpu_lock_is_emlab_pins_with_only_the_declared_vllm_overrides():
    """requirements-gpu.lock (make setup GPU=1) pins every package; it differs from pyproject's pins only where
    lockfile.GPU_OVERRIDES says (what vLLM requires), so a pin changed in pyproject cannot be forgotten there."""
    from packaging.requirements import Requirement

    from emlab import lockfile

    lock = dict(line.split("==") for line in (lockfile.ROOT / "requirements-gpu.lock").read_text().splitlines()
                if line and not line.startswith("#"))
    norm = {k.lower().replace("_", "-"): v for k, v in lock.items()}
    for pin in lockfile.pins():
        name = lockfile._name(pin)
        want = Requirement(lockfile.GPU_OVERRIDES.get(name, pin))
        assert name in norm and want.specifier.contains(norm[name]), (pin, norm.get(name))
    assert Requirement(lockfile.GPU_OVERRIDES["vllm"]).specifier.contains(norm["vllm"])


def test_gpu_requirements_replace_the_overridden_pins_and_lock_reads_pips_report():
    from emlab import lockfile

    reqs = lockfile.gpu_requirements(["torch==2.13.0", "Numpy==2.4.6", "pandas==3.1.1"],
                                     {"torch": "torch==2.14.0", "numpy": "numpy<2.4", "vllm": "vllm==0.33.0"})
    assert reqs == ["pandas==3.1.1", "torch==2.14.0", "numpy<2.4", "vllm==0.33.0"]
    report = {"install": [{"metadata": {"name": n, "version": v}} for n, v in
                          [("torch", "2.14.0"), ("emlab", "0.1.0"), ("Jinja2", "3.1.6")]]}
    assert lockfile.lock_from_report(report) == ["Jinja2==3.1.6", "torch==2.14.0"]
