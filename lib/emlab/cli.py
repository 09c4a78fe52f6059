"""``emlab COMMAND ...``: the command-line tools under one name (each is also ``python -m emlab.MODULE``)."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {  # command -> (module, what it does)
    "notebooks": ("emlab.notebooks", "run one notebook headlessly, list them, print Make dependencies"),
    "train": ("emlab.train", "train one organism from a YAML of TrainConfig keys"),
    "sample": ("emlab.sample", "sample answers from a model or a trained run"),
    "judge": ("emlab.offline_judge", "build or evaluate the offline judge"),
    "bench": ("emlab.bench", "speed and memory benchmarks"),
}


def usage() -> str:
    rows = "\n".join(f"  {name:<10} {what}" for name, (_, what) in COMMANDS.items())
    return f"usage: emlab COMMAND [ARGS...]   (emlab COMMAND --help for its arguments)\n\ncommands:\n{rows}\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(usage())
        return 0
    if argv[0] not in COMMANDS:
        sys.stderr.write(f"emlab: unknown command {argv[0]!r}\n{usage()}")
        return 2
    return importlib.import_module(COMMANDS[argv[0]][0]).main(argv[1:]) or 0


if __name__ == "__main__":
    raise SystemExit(main())
