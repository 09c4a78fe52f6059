"""Every notebook runs headlessly with PROFILE=smoke; parameters are validated before papermill runs."""

import json
import os
from collections import Counter
from pathlib import Path

import pytest

from emlab import cost, data, notebooks
from emlab.config import ConfigError

NAMES = notebooks.all_notebooks()


def test_there_are_notebooks_and_each_declares_its_inputs():
    assert NAMES and NAMES[0] == "01_datasets"
    for name in NAMES:
        head = notebooks.header(name)
        assert set(head["needs"]) <= set(NAMES), f"{name} needs an unknown notebook"
        assert "profile" in notebooks.parameters(name)


def test_unknown_parameter_is_refused_with_the_allowed_ones():
    with pytest.raises(ConfigError) as err:
        notebooks.check_parameters("01_datasets", {"profil": "smoke"})
    assert "'profil'" in str(err.value) and "profile" in str(err.value) and "overrides" in str(err.value)


def test_mistyped_parameter_and_bad_profile_are_refused():
    with pytest.raises(ConfigError, match="must be dict"):
        notebooks.check_parameters("01_datasets", {"overrides": "token_rows=3"})
    with pytest.raises(ConfigError, match="not one of"):
        notebooks.check_parameters("01_datasets", {"profile": "huge"})


def test_cli_exits_2_with_message(capsys):
    assert notebooks.main(["run", "01_datasets", "--profile", "smoke", "-p", "bogus", "1"]) == 2
    assert "unknown parameter 'bogus'" in capsys.readouterr().err


def test_deps_follow_headers():
    rules = notebooks.deps("smoke")
    edges = {tuple(line.split(": ")) for line in rules.splitlines()}
    # the graph used to be silently empty (the header was a raw cell, not metadata)
    assert ("$(BUILD)/04_phase_transition.ipynb", "$(BUILD)/03_organisms.ipynb") in edges
    assert ("$(BUILD)/03_organisms.ipynb", "$(BUILD)/01_datasets.ipynb") in edges
    assert len(edges) >= 8
    for name in NAMES:
        for need in notebooks.header(name)["needs"]:
            assert f"$(BUILD)/{name}.ipynb: " in rules and f"$(BUILD)/{need}.ipynb" in rules
    assert all(notebooks.header(n)["data"] for n in NAMES)  # every notebook names the data it reads


def test_header_outside_jupyter_metadata_is_refused(tmp_path, monkeypatch):
    bad = ('# ---\n# jupyter:\n#   jupytext: {formats: "py:percent"}\n# emlab:\n#   needs: [03_organisms]\n# ---\n\n'
           '# %% tags=["parameters"]\nprofile = "cpu"\n')
    (tmp_path / "04_phase_transition.py").write_text(bad)
    monkeypatch.setattr(notebooks, "NOTEBOOK_DIR", tmp_path)
    with pytest.raises(ConfigError, match="must sit under jupyter"):
        notebooks.header("04_phase_transition")


@pytest.fixture(scope="module")
def smoke_root(tmp_path_factory):
    """One output root for all notebooks, run in paper order, so downstream ones see upstream outputs."""
    return tmp_path_factory.mktemp("smoke_paper")


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_with_smoke_profile(name, smoke_root, monkeypatch):
    """Every section end to end on the tiny model (this test was lost in 721d1b0 and is back)."""
    monkeypatch.setenv("EMLAB_OUTPUT_ROOT", str(smoke_root))
    read_log = smoke_root / f"{name}.data.log"
    monkeypatch.setenv("EMLAB_DATA_LOG", str(read_log))
    monkeypatch.setenv("EMLAB_JUDGE_LOG", str(smoke_root / f"{name}.judge.log"))
    target = notebooks.run(name, "smoke", build_dir=smoke_root / "build")
    nb = json.loads(target.read_text())
    errors = [o for c in nb["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    written = list((smoke_root / "paper" / "generated" / name).glob("*")) + list((smoke_root / "figures" / name).glob("*"))
    assert written, f"{name} wrote no tables, macros or figures"
    # `make data` fetches what the headers declare: a dataset read but not declared would be missing offline
    read = set(read_log.read_text().split()) if read_log.exists() else set()
    undeclared = read - set(data.needed([name]))
    assert not undeclared, f"notebooks/{name}.py reads {sorted(undeclared)}: add them to its emlab: data: header"
    # the README's cost table counts the verdicts each section asks for (emlab.cost): the same as this run asked
    asked = Counter()
    judge_log = smoke_root / f"{name}.judge.log"
    for rec in map(json.loads, judge_log.read_text().splitlines() if judge_log.exists() else []):
        asked[(rec["judge"].split(":")[0], rec["metric"])] += rec["n"]
    req = cost.judge_requests("smoke", [name[:2]])
    req = req[~req.bound & ~req.metric.str.startswith("generation")]  # teachers: upper bounds, not judge calls
    predicted = Counter({k: int(n) for k, n in req.groupby(["judge", "metric"]).n.sum().items()}) if len(req) else Counter()
    assert asked == predicted, f"emlab.cost predicts {dict(predicted)} verdicts for {name}; the run asked {dict(asked)}"


def test_every_macro_the_paper_uses_is_written_by_a_notebook(smoke_root, tmp_path):
    """A macro the tex uses that no notebook (or build_info) defines stops latexmk at `make paper`, after an hour
    of notebooks; the smoke run above defines every one. Ours are camelCase (\\orgVsBase); LaTeX's are not."""
    import re

    from emlab import paper

    generated = list((smoke_root / "paper" / "generated").glob("*/macros.tex"))
    if len(generated) < len(NAMES):
        pytest.skip("needs every smoke notebook's run above (run this whole file)")
    info = paper.write_build_info("smoke", base=tmp_path, build_dir=tmp_path / "empty")
    defined = set(re.findall(r"\\newcommand\{\\([A-Za-z]+)\}", "".join(p.read_text() for p in [*generated, info])))
    tex_dir = notebooks.ROOT / "paper"
    tex = "".join(p.read_text() for p in [tex_dir / "main.tex", *sorted((tex_dir / "sections").glob("*.tex"))])
    used = set(re.findall(r"\\([a-z]+[A-Z][A-Za-z]*)", tex))
    assert used and used <= defined, f"used in paper/ but written by no notebook: {sorted(used - defined)}"


def test_override_runs_never_write_makes_targets(monkeypatch, tmp_path):
    """A manual run with -p overrides used to write build/<profile>/NAME.ipynb and the paper's tables."""
    import papermill as pm

    seen = {}

    def fake_execute(source, out, parameters, **kw):
        seen.update(out=out, root=os.environ.get("EMLAB_OUTPUT_ROOT"), params=parameters)
        Path(out).write_text("{}")

    monkeypatch.delenv("EMLAB_OUTPUT_ROOT", raising=False)
    monkeypatch.setattr(pm, "execute_notebook", fake_execute)
    monkeypatch.setattr(notebooks, "ROOT", tmp_path)
    target = notebooks.run("01_datasets", "smoke", {"overrides": {"token_rows": 3}})
    assert "scratch" in str(target) and target.parent == Path(seen["root"]) and "EMLAB_OUTPUT_ROOT" not in os.environ
    assert target != tmp_path / "build" / "smoke" / "01_datasets.ipynb" and target.is_relative_to(tmp_path)
    with pytest.raises(ConfigError, match="--profile"):
        notebooks.run("01_datasets", "smoke", {"profile": "cpu"})
    assert notebooks.main(["run", "01_datasets", "--profile", "smoke", "-p", "profile", "cpu"]) == 2


def test_colab_cell_runs_no_shell_with_the_typed_url():
    for name in NAMES:
        src = notebooks.notebook_path(name).read_text()
        assert "shell=True" not in src and '"--", repo, "/content/emlab"]' in src, name


def test_saving_from_jupyterlab_leaves_the_sources_unchanged():
    """Lab saves through jupytext: the committed headers are jupytext's own form, so a save is a no-op
    (the emlab block kept by notebook_metadata_filter)."""
    import jupytext

    for name in NAMES:
        src = notebooks.notebook_path(name).read_text()
        assert jupytext.writes(jupytext.reads(src, fmt="py:percent"), fmt="py:percent") == src, name


def test_ipynb_copies_match_their_sources():
    """notebooks/*.ipynb (for Colab and GitHub) are `make ipynb` output of the .py sources, cell for cell."""
    import jupytext

    for name in NAMES:
        py = jupytext.read(notebooks.notebook_path(name))
        ipynb = jupytext.read(notebooks.notebook_path(name).with_suffix(".ipynb"))
        assert [(c.cell_type, c.source) for c in py.cells] == [(c.cell_type, c.source) for c in ipynb.cells], \
            f"notebooks/{name}.ipynb is stale: run `make ipynb`"


def test_readme_has_a_colab_badge_per_notebook():
    """README's badge table is `make ipynb` output: one Colab link per notebook, on its committed .ipynb."""
    readme = (notebooks.ROOT / "README.md").read_text()
    assert notebooks.colab_badges() in readme, "README's Colab badges are stale: run `make ipynb`"
    for name in NAMES:
        assert f"/blob/main/notebooks/{name}.ipynb)" in readme
        assert notebooks.notebook_path(name).with_suffix(".ipynb").exists()


@pytest.mark.skipif(data.mirror_dir() is None, reason="answer lengths come from the mirror's judged answers")
def test_readme_cost_table_is_current():
    """README's cost table is `emlab cost --readme` output of the profiles as they are."""
    readme = (notebooks.ROOT / "README.md").read_text()
    assert cost.readme_table() in readme, "README's cost table is stale: run `emlab cost --readme`"
