"""``emlab COMMAND ...``: the command-line tools under one name (each is also ``python -m emlab.MODULE``)."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {  # command -> (module, what it does)
    "notebooks": ("emlab.notebooks", "run one notebook headlessly, list them, print Make dependencies"),
    "data": ("emlab.data", "fetch and verify the datasets the notebooks read (make data), or list them"),
    "config": ("emlab.cli", "show a profile's resolved config for an experiment, with each key's source"),
    "train": ("emlab.organisms", "train one organism from a YAML of TrainConfig keys, or a profile's §03 organisms"),
    "sample": ("emlab.sample", "sample answers from the profile's model or a trained run; or bench"),
    "judge": ("emlab.judge", "score a file of answers with the profile's judge"),
    "offline-judge": ("emlab.offline_judge", "build or evaluate the offline judge"),
    "cost": ("emlab.cost", "what each profile costs in judge calls and dollars at list price (README's table)"),
    "bench": ("emlab.bench", "speed and memory benchmarks"),
    "gpu-check": ("emlab.gpucheck", "GPU acceptance checks (one line on a machine without CUDA)"),
}


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as pkg_version

    from emlab.paper import git_commit

    try:
        v = pkg_version("emlab")
    except PackageNotFoundError:
        v = "not installed"
    return f"emlab {v} (commit {git_commit()})"


def config_main(argv: list[str]) -> int:
    """``emlab config show PROFILE EXPERIMENT [-p KEY VALUE]``: every key, its value and where it came from."""
    import argparse
    import json

    from emlab import config

    sections = list(config.experiments())
    ap = argparse.ArgumentParser(prog="emlab config")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("show", help="the resolved config with each key's source")
    s.add_argument("profile", choices=config.PROFILES)
    s.add_argument("experiment", choices=sections)
    s.add_argument("-p", nargs=2, action="append", default=[], metavar=("KEY", "JSON"),
                   help="an override, as a notebook's `overrides` would give it")
    args = ap.parse_args(argv)
    overrides = {key: config.cli_value(value) for key, value in args.p}
    try:
        rows = config.explain(config.experiments()[args.experiment], args.profile, overrides)
    except config.ConfigError as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    width = max(len(k) for k, _, _ in rows)
    for key, value, source in rows:
        sys.stdout.write(f"{key:<{width}}  {json.dumps(value)}  [{source}]\n")
    return 0


def usage() -> str:
    rows = "\n".join(f"  {name:<14} {what}" for name, (_, what) in COMMANDS.items())
    return (f"usage: emlab [--version] COMMAND [ARGS...]   (emlab COMMAND --help for its arguments)\n\n"
            f"commands:\n{rows}\n")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        sys.stdout.write(version() + "\n")
        return 0
    if argv[0] == "config":
        return config_main(argv[1:])
    if argv[0] not in COMMANDS:
        sys.stderr.write(f"emlab: unknown command {argv[0]!r}\n{usage()}")
        return 2
    return importlib.import_module(COMMANDS[argv[0]][0]).main(argv[1:]) or 0


if __name__ == "__main__":
    raise SystemExit(main())
