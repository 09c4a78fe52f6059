"""The GPU install's lock: emlab's pins plus vLLM, resolved by pip (``make lock-gpu``; ``make setup GPU=1``).

vLLM pins its own torch and an older transformers than emlab's CPU install, so the two cannot share one
environment. The GPU lock therefore takes pyproject's pins, replaces the few that vLLM constrains
(:data:`GPU_OVERRIDES`, said in the README and recorded in every run's manifest), lets pip resolve the rest
(``pip install --dry-run --report``: no install, no GPU needed) and writes every package it would install.
``make setup GPU=1`` installs exactly that list, then emlab itself without dependencies.
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# what vLLM 0.33.0 requires differently from the CPU pins (its metadata: torch==2.14.0, transformers<5.20, of
# which 5.19.0 is the newest; mistral-common, a vLLM dependency, numpy<2.4 on Python <= 3.12). A new vLLM:
# change these to its requirements, then `make lock-gpu`.
GPU_OVERRIDES = {"torch": "torch==2.14.0", "transformers": "transformers==5.19.0", "numpy": "numpy<2.4",
                 "vllm": "vllm==0.33.0"}
HEADER = ("# Every package of the GPU install (make setup GPU=1), pinned: emlab's pins with "
          "lib/emlab/lockfile.py's GPU_OVERRIDES, resolved by pip (make lock-gpu).")


def _name(req: str) -> str:
    return re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0].lower().replace("_", "-")


def pins(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """pyproject's runtime and dev pins."""
    project = tomllib.loads(pyproject.read_text())["project"]
    return [d.split("#")[0].strip() for d in project["dependencies"] + project["optional-dependencies"]["dev"]]


def gpu_requirements(base: list[str], overrides: dict[str, str] = GPU_OVERRIDES) -> list[str]:
    """``base`` with every package named in ``overrides`` replaced (or added)."""
    keep = [r for r in base if _name(r) not in overrides]
    return keep + [overrides[k] for k in overrides]


def lock_from_report(report: dict) -> list[str]:
    """``name==version`` of every package in a ``pip install --report``, sorted, emlab itself left out."""
    got = {item["metadata"]["name"]: item["metadata"]["version"] for item in report["install"]}
    return sorted((f"{n}=={v}" for n, v in got.items() if _name(n) != "emlab"), key=str.lower)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m emlab.lockfile", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "requirements-gpu.lock")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        req, rep = Path(tmp) / "requirements.txt", Path(tmp) / "report.json"
        req.write_text("\n".join(gpu_requirements(pins())) + "\n")
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
               "--report", str(rep), "-r", str(req)]
        if subprocess.run(cmd).returncode:
            print(f"pip could not resolve emlab's pins with {sorted(GPU_OVERRIDES.values())}; change "
                  "GPU_OVERRIDES in lib/emlab/lockfile.py to what the new vLLM release requires", file=sys.stderr)
            return 1
        lines = lock_from_report(json.loads(rep.read_text()))
    where = f"# resolved by pip for Python {platform.python_version()} on {platform.system()} {platform.machine()}"
    args.out.write_text(HEADER + "\n" + where + "\n" + "\n".join(lines) + "\n")
    print(f"{args.out.name}: {len(lines)} pinned packages")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
