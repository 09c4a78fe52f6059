"""Run the paper's notebooks headlessly (papermill) and tell Make what each one depends on.

Each notebook ``notebooks/NN_name.py`` (jupytext percent format, the source of truth) declares in its
header which upstream notebooks and datasets it reads:

    # emlab:
    #   needs: [03_organisms]
    #   data: [bad_medical_advice]

``python -m emlab.notebooks deps`` turns that into Make rules; ``python -m emlab.notebooks run NAME``
executes one notebook into ``build/<profile>/NAME.ipynb``. Parameters are checked against the
notebook's ``parameters`` cell first: papermill only warns about unknown ones, we refuse them.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import jupytext

from emlab import launch
from emlab.config import PROFILES, ConfigError, cli_value

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK_DIR = ROOT / "notebooks"
log = logging.getLogger(__name__)


def notebook_path(name: str) -> Path:
    path = NOTEBOOK_DIR / f"{name}.py"
    if not path.exists():
        known = ", ".join(all_notebooks())
        raise ConfigError(f"no notebook {path.relative_to(ROOT)}; known notebooks: {known}")
    return path


def all_notebooks() -> list[str]:
    """Notebook names in paper order (``NN_name``)."""
    return sorted(p.stem for p in NOTEBOOK_DIR.glob("[0-9][0-9]_*.py"))


def header(name: str) -> dict[str, list[str]]:
    """The ``emlab:`` block of a notebook's jupytext header (needs, data)."""
    nb = jupytext.read(notebook_path(name))
    # jupytext keeps only the `jupyter:` block as metadata; a top-level `emlab:` becomes a raw cell and
    # was silently ignored (an empty Make graph), so refuse it
    first = nb.cells[0] if nb.cells else None
    if first is not None and first.cell_type == "raw" and "emlab:" in first.source:
        raise ConfigError(f"notebooks/{name}.py header: the emlab: block must sit under jupyter: (indented), "
                          "where jupytext keeps it as notebook metadata")
    meta = nb.metadata.get("emlab") or {}
    unknown = set(meta) - {"needs", "data"}
    if unknown:
        raise ConfigError(f"notebooks/{name}.py header: unknown emlab keys {sorted(unknown)} (allowed: needs, data)")
    return {"needs": list(meta.get("needs") or []), "data": list(meta.get("data") or [])}


def parameters(name: str) -> dict[str, Any]:
    """Names and default values of the notebook's ``parameters`` cell (literals only)."""
    nb = jupytext.read(notebook_path(name))
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    if len(cells) != 1:
        raise ConfigError(f"notebooks/{name}.py must have exactly one cell tagged 'parameters' (found {len(cells)})")
    out: dict[str, Any] = {}
    for node in ast.parse(cells[0].source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            out[node.targets[0].id] = ast.literal_eval(node.value)
    return out


def check_parameters(name: str, params: dict[str, Any]) -> None:
    """Refuse parameters the notebook does not declare, or whose type differs from the default's."""
    declared = parameters(name)
    for key, value in params.items():
        if key not in declared:
            raise ConfigError(f"notebook {name}: unknown parameter {key!r}; allowed: {', '.join(declared)}")
        default = declared[key]
        if default is not None and value is not None and type(value) is not type(default):
            raise ConfigError(f"notebook {name}: parameter {key!r} must be {type(default).__name__} "
                              f"like its default {default!r}, got {type(value).__name__} {value!r}")
    if params.get("profile", "cpu") not in PROFILES:
        raise ConfigError(f"notebook {name}: profile {params['profile']!r} is not one of {', '.join(PROFILES)}")


def run(name: str, profile: str = "cpu", params: dict[str, Any] | None = None,
        build_dir: Path | None = None) -> Path:
    """Execute one notebook with papermill; the executed copy lands atomically in ``build/<profile>/``.

    A run with parameters beyond the profile (``-p overrides ...``) is not the run Make would do: its
    notebook, tables and figures go to ``build/scratch/<profile>-<name>-<hash>/`` so the paper is never
    built from a run nobody configured (unless ``build_dir`` / ``EMLAB_OUTPUT_ROOT`` say where)."""
    import papermill as pm

    if "profile" in (params or {}):
        raise ConfigError(f"notebook {name}: give the profile with --profile, not as a parameter")
    params = {"profile": profile, **(params or {})}
    check_parameters(name, params)
    scratch = build_dir is None and len(params) > 1 and not os.environ.get("EMLAB_OUTPUT_ROOT")
    if scratch:
        key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:8]
        build_dir = ROOT / "build" / "scratch" / f"{profile}-{name}-{key}"
        log.warning("parameters %s differ from profile %s: outputs go to %s, not to the paper", params, profile,
                    build_dir)
    build_dir = Path(build_dir or ROOT / "build" / profile)
    build_dir.mkdir(parents=True, exist_ok=True)
    source = build_dir / f"{name}.source.ipynb"
    jupytext.write(jupytext.read(notebook_path(name)), source)
    target, partial = build_dir / f"{name}.ipynb", build_dir / f"{name}.partial.ipynb"
    log.info("running notebook %s (profile %s) -> %s", name, profile, target)
    start = time.time()
    if scratch:
        os.environ["EMLAB_OUTPUT_ROOT"] = str(build_dir)  # the kernel inherits it: Section writes there
    headless = os.environ.get("EMLAB_HEADLESS")
    os.environ["EMLAB_HEADLESS"] = "1"  # the kernel logs and shows text progress bars (emlab.logs)
    try:
        pm.execute_notebook(str(source), str(partial), parameters=params, cwd=str(NOTEBOOK_DIR),
                            kernel_name="python3", log_output=True, progress_bar=sys.stderr.isatty())
    finally:
        if scratch:
            os.environ.pop("EMLAB_OUTPUT_ROOT", None)
        if headless is None:
            os.environ.pop("EMLAB_HEADLESS", None)
    partial.replace(target)  # a killed run leaves no target, so Make runs it again
    source.unlink(missing_ok=True)
    log.info("notebook %s done in %.0f s", name, time.time() - start)
    return target


def deps(profile: str) -> str:
    """Make rules: each executed notebook depends on its upstream notebooks."""
    lines = []
    for name in all_notebooks():
        needs = " ".join(f"$(BUILD)/{n}.ipynb" for n in header(name)["needs"])
        if needs:
            lines.append(f"$(BUILD)/{name}.ipynb: {needs}")
    return "\n".join(lines) + "\n"


def repository() -> str:
    """The public GitHub repository (``owner/name``) named once in pyproject.toml's ``[project.urls]``."""
    import tomllib

    url = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]["Repository"]
    return url.removeprefix("https://github.com/").strip("/")


COLAB_BEGIN, COLAB_END = "<!-- colab-badges: begin (make ipynb) -->", "<!-- colab-badges: end -->"


def colab_badges(branch: str = "main") -> str:
    """The README's table of notebooks, each with an "Open in Colab" badge on its ``.ipynb`` copy."""
    repo = repository()
    rows = ["| § | notebook | Colab |", "|---|---|---|"]
    for name in all_notebooks():
        title = next((c.source.lstrip("# ").split("\n")[0].split(" · ", 1)[-1] for c in jupytext.read(notebook_path(name)).cells
                      if c.cell_type == "markdown"), name)
        url = f"https://colab.research.google.com/github/{repo}/blob/{branch}/notebooks/{name}.ipynb"
        rows.append(f"| {name[:2]} | [{title}](notebooks/{name}.py) | "
                    f"[![Open in Colab](https://colab.research.google.com/assets/colab-badge.svg)]({url}) |")
    return "\n".join(rows)


def replace_between(path: Path, begin: str, end: str, body: str) -> None:
    """Rewrite the generated block between two marker lines of ``path`` (README tables)."""
    text = path.read_text()
    if begin not in text or end not in text:
        raise ConfigError(f"{path}: the markers {begin!r} ... {end!r} are missing; put them where the block goes")
    head, rest = text.split(begin, 1)
    path.write_text(head + begin + "\n" + body + "\n" + end + rest.split(end, 1)[1])


def write_colab_badges(readme: Path = ROOT / "README.md") -> None:
    """Replace the badge table between the README's markers (``make ipynb`` calls this)."""
    replace_between(readme, COLAB_BEGIN, COLAB_END, colab_badges())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m emlab.notebooks", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="execute one notebook")
    r.add_argument("name")
    r.add_argument("--profile", choices=PROFILES, default=os.environ.get("PROFILE", "cpu"))
    r.add_argument("-p", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"))
    r.add_argument("--launcher", default=os.environ.get("LAUNCHER", "local"),
                   help="local (here), slurm (a submitit job; see emlab.launch), submitit-local or debug")
    d = sub.add_parser("deps", help="print Make dependencies")
    d.add_argument("--profile", choices=PROFILES, default="cpu")
    sub.add_parser("list", help="notebook names in order")
    sub.add_parser("colab-badges", help="rewrite README's table of Open-in-Colab badges")
    args = ap.parse_args(argv)
    from emlab.logs import setup_logging

    setup_logging(logging.INFO)
    try:
        if args.cmd == "run":
            params = {k: cli_value(v) for k, v in args.p}
            if "profile" in params:
                raise ConfigError("give the profile with --profile, not -p profile (it would silently win)")
            check_parameters(args.name, {"profile": args.profile, **params})  # fail here, not in a job
            launch.submit(run, args.name, args.profile, params, launcher=args.launcher, name=args.name)
        elif args.cmd == "deps":
            sys.stdout.write(deps(args.profile))
        elif args.cmd == "colab-badges":
            write_colab_badges()
        else:
            print(" ".join(all_notebooks()))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
