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
