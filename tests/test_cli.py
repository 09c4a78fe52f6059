"""emlab.cli: the `emlab` console script reaches every tool and refuses unknown commands."""

import importlib

import pytest

from emlab import cli


def test_every_command_names_a_module_with_main():
    for module, _ in cli.COMMANDS.values():
        assert callable(importlib.import_module(module).main)


def test_help_lists_commands(capsys):
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in cli.COMMANDS)


def test_unknown_command_is_an_error(capsys):
    assert cli.main(["trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err


def test_dispatches_to_the_module(capsys):
    assert cli.main(["notebooks", "list"]) == 0
    assert "01_datasets" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # argparse's own --help of the sub-tool
        cli.main(["train", "--help"])


def test_version_and_config_show_with_sources(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("emlab 0.1.0 (commit ")
    assert cli.main(["config", "show", "cpu", "phase", "-p", "eval_checkpoints", "3"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert rows["model.name"].endswith("[common]") and rows["seed"].endswith("[default]")
    assert rows["eval.samples_per_question"].endswith("[phase]") and rows["eval_checkpoints"].endswith("[override]")
    with pytest.raises(SystemExit):
        cli.main(["config", "show", "cpu", "nosuchsection"])
    assert cli.main(["config", "show", "cpu", "phase", "-p", "nope", "1"]) == 2
    assert "unknown key 'nope'" in capsys.readouterr().err


def test_sample_run_and_judge_score(tmp_path, capsys, monkeypatch):
    """`emlab sample run` samples for real (tiny model); `emlab judge score` judges a samples file."""
    from emlab import judge

    out = tmp_path / "answers.jsonl"
    assert cli.main(["sample", "run", "--profile", "smoke", "--questions", "first_plot", "--out", str(out),
                     "-p", "n_per_question", "1", "-p", "max_new_tokens", "4"]) == 0
    assert "8 answers" in capsys.readouterr().out

    class Fake:
        id = "fake"

        def score_many(self, metric, items):
            return [judge.Score(50.0, None, {}) for _ in items]

    monkeypatch.setattr(judge, "get_judge", lambda spec: Fake())
    scored = tmp_path / "scored.csv"
    assert cli.main(["judge", "score", str(out), "--profile", "smoke", "--out", str(scored)]) == 0
    import pandas as pd

    df = pd.read_csv(scored)
    assert len(df) == 8 and (df.aligned == 50.0).all() and "coherent_label" in df
    (tmp_path / "bad.csv").write_text("q,a\n1,2\n")
    assert cli.main(["judge", "score", str(tmp_path / "bad.csv"), "--profile", "smoke", "--out", str(scored)]) == 2
    assert "missing column(s) ['question', 'text']" in capsys.readouterr().err
