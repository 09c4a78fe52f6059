"""Paper outputs: every table, figure and number in the PDF is written here by the code that computed it.

A notebook makes one :class:`Section`; it writes
  tables   -> paper/generated/<section>/<name>.tex (+ .csv beside it)
  figures  -> figures/<section>/<name>.pdf (+ .png for the notebook and README)
  numbers  -> paper/generated/<section>/macros.tex as ``\\newcommand`` macros
so the LaTeX never holds a typed-in result (showyourwork's rule).
"""

from __future__ import annotations

import logging
import math
import os
import re
import subprocess
import unicodedata
from pathlib import Path
from typing import Any

import pandas as pd

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
_MACRO_NAME = re.compile(r"^[A-Za-z]+$")
_LATEX_SPECIAL = {"&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
                  "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "\\": r"\textbackslash{}",
                  # OT1 text fonts print | < > as an em dash and inverted punctuation
                  "|": r"\textbar{}", "<": r"\textless{}", ">": r"\textgreater{}"}


def root() -> Path:
    """Repository root (where figures/ and paper/ live)."""
    return ROOT


# Beyond ASCII, what pdflatex prints with main.tex's preamble (utf8 input, OT1 fonts): accented Latin-1 letters,
# typographic quotes and dashes, and the symbols main.tex declares with \newunicodechar (a test keeps the two in step)
_TEX_UNICODE = frozenset("ÀÁÂÃÄÅÆÇÈÉÊËÌÍÎÏÑÒÓÔÕÖØÙÚÛÜÝàáâãäåæçèéêëìíîïñòóôõöøùúûüýÿßŒœ¡¿£§°±·×÷"
                         "‘’“”–—…•€" "Δ−λ≤≥→")


def _tex_char(c: str) -> str:
    if c in _LATEX_SPECIAL:
        return _LATEX_SPECIAL[c]
    if " " <= c <= "~" or c in _TEX_UNICODE:
        return c
    if c in "\t\n\r" or unicodedata.category(c).startswith("Z"):  # any other space or line separator
        return " "
    if unicodedata.category(c).startswith("C"):  # control, format, unassigned: nothing to print
        return ""
    return f"[U+{ord(c):04X}]"  # model text in any script: named, so the paper still builds (pdflatex lacks it)


def latex_escape(text: Any) -> str:
    """``text`` as LaTeX source that pdflatex compiles: specials escaped; a character the preamble cannot
    print (a model's answer may hold any) becomes ``[U+XXXX]``, control characters are dropped."""
    return "".join(map(_tex_char, str(text)))


def caption_text(text: str) -> str:
    """Captions may hold LaTeX (math, \\%, \\texttt): escape only the bare ``_ % & #`` outside ``$...$``,
    which is what run-time names (datasets, organisms) bring in."""
    parts = str(text).split("$")
    for i in range(0, len(parts), 2):  # even parts are outside math
        parts[i] = re.sub(r"(?<!\\)([_%&#])", r"\\\1", parts[i])
    return "$".join(parts)


def fmt(value: Any, digits: int = 1) -> str:
    """Numbers as the paper prints them: fixed digits, ints without decimals, NaN as an em dash."""
    if isinstance(value, bool) or value is None:
        return "--" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}".replace(",", "{,}")
    if isinstance(value, float):
        return "--" if math.isnan(value) else f"{value:.{digits}f}"
    return latex_escape(value)


INTERACTIVE_ROOT = ROOT / "build" / "scratch" / "interactive"


def _interactive() -> bool:
    """In a Jupyter kernel that Make's runner did not start (emlab.logs.headless)."""
    import sys

    from emlab.logs import headless

    return "ipykernel" in sys.modules and not headless()


MAX_COLUMNS = 8


def _column_parts(df: pd.DataFrame) -> list[list[str]]:
    """Column groups of at most MAX_COLUMNS, each repeating the leading non-numeric (label) columns."""
    cols = list(df.columns)
    if len(cols) <= MAX_COLUMNS:
        return [cols]
    keys = []
    for c in cols:
        if pd.api.types.is_numeric_dtype(df[c]) or len(keys) >= MAX_COLUMNS // 2:
            break
        keys.append(c)
    rest = [c for c in cols if c not in keys]
    step = MAX_COLUMNS - len(keys)
    chunks = [rest[i:i + step] for i in range(0, len(rest), step)]
    return [keys + chunk for chunk in chunks]


LONG_TEXT = 80  # characters: a longer text column wraps


def _tabular(df: pd.DataFrame, digits: int) -> str:
    cols = [latex_escape(c) for c in df.columns]
    body = [" & ".join(fmt(v, digits) for v in row) + r" \\" for row in df.itertuples(index=False)]
    def spec(c) -> str:  # prose (an answer shown in the paper) wraps in a paragraph column
        if pd.api.types.is_numeric_dtype(df[c]):
            return "r"
        return r"p{0.55\linewidth}" if df[c].astype(str).str.len().max() > LONG_TEXT else "l"

    align = "".join(spec(c) for c in df.columns)
    return "\n".join([rf"\begin{{adjustbox}}{{max width=\linewidth}}\begin{{tabular}}{{{align}}}", r"\toprule",
                      " & ".join(cols) + r" \\", r"\midrule", *body, r"\bottomrule",
                      r"\end{tabular}\end{adjustbox}"])


TEXT_WIDTH_IN = 6.5  # \\textwidth of paper/main.tex (letter paper, 1 in margins)
FONT_PT = 8  # figure text at its printed size (the paper's 11 pt body, footnote-sized in figures)
# One colour per training domain / model family in every section (a name not listed cycles the rest).
COLORS = {"base": "0.35", "bad_medical": "C0", "good_medical": "C7", "risky_financial": "C1", "extreme_sports": "C2",
          "insecure": "C3", "evil": "C3", "incorrect": "C0", "sycophantic": "C4", "hallucinating": "C5",
          "Qwen": "C0", "Llama": "C1", "gemma": "C2", "Mistral": "C4", "gpt": "C3"}


def use_theme() -> None:
    """One look for every figure: seaborn's ``paper`` context at the printed font size."""
    import seaborn as sns

    small = FONT_PT - 1
    sns.set_theme(context="paper", style="ticks", rc={
        "font.size": FONT_PT, "axes.labelsize": FONT_PT, "axes.titlesize": FONT_PT, "legend.fontsize": small,
        "legend.title_fontsize": small, "xtick.labelsize": small, "ytick.labelsize": small, "savefig.dpi": 200})


def color(name: str) -> str | None:
    """The colour of an organism, training set or model family, the same in every section (None: not one
    of :data:`COLORS`)."""
    text = str(name)
    for key, c in COLORS.items():
        if text.lower().startswith(key.lower()) or f"/{key}" in text:
            return c
    return None


def palette(names) -> dict[str, str]:
    """``{name: colour}`` for seaborn's ``palette=``: :func:`color` where it knows the name, else the colours
    no family uses, in order."""
    spare = [c for c in (f"C{i}" for i in range(10)) if c not in COLORS.values()]
    out, k = {}, 0
    for n in dict.fromkeys(names):
        out[n] = color(n) or spare[k % len(spare)]
        k += color(n) is None
    return out


def included_width(section: str, name: str) -> float:
    """The fraction of ``\\linewidth`` at which ``paper/sections/<section>.tex`` includes figure ``name``
    (1.0 when it is not included): figures are saved at their printed width, so their text prints at
    :data:`FONT_PT`."""
    tex = ROOT / "paper" / "sections" / f"{section}.tex"
    pattern = rf"\\includegraphics\[width=([0-9.]*)\\linewidth\]\{{{re.escape(section)}/{re.escape(name)}\.pdf\}}"
    m = re.search(pattern, tex.read_text()) if tex.exists() else None
    return float(m.group(1) or 1.0) if m else 1.0


class Section:
    """Output writer of one notebook (paper section)."""

    def __init__(self, name: str, base: Path | None = None):
        # EMLAB_OUTPUT_ROOT lets tests run notebooks without touching the repo's figures/ and paper/; an
        # interactive kernel (Lab, Colab) writes to build/scratch/interactive/, so trying a notebook never
        # changes the outputs the paper is built from (Make's headless runs write to the repo).
        base = Path(base or os.environ.get("EMLAB_OUTPUT_ROOT") or (INTERACTIVE_ROOT if _interactive() else ROOT))
        self.name = name
        self.tables_dir = base / "paper" / "generated" / name
        self.figures_dir = base / "figures" / name
        self.tables_dir.mkdir(parents=True, exist_ok=True)
        self._macros: dict[str, str] = {}
        use_theme()

    def table(self, df: pd.DataFrame, name: str, caption: str, digits: int = 1, index: bool = False) -> Path:
        """Write ``df`` as CSV (full precision) and as a booktabs LaTeX table (formatted). A table is only
        ever scaled down to the text width, never up; one wider than ``MAX_COLUMNS`` is split into stacked
        parts that repeat its leading label columns."""
        df.to_csv(self.tables_dir / f"{name}.csv", index=index)
        shown = df.reset_index() if index else df
        label = f"tab:{self.name}:{name}"
        parts = [_tabular(shown[cols], digits) for cols in _column_parts(shown)]
        tex = "\n".join([
            r"\begin{table}[t]", r"\centering", r"\small",
            rf"\caption{{{caption_text(caption)}}}", rf"\label{{{label}}}", "\n\\par\\medskip\n".join(parts),
            r"\end{table}", "",
        ])
        path = self.tables_dir / f"{name}.tex"
        path.write_text(tex)
        log.info("table %s (%d rows) -> %s", name, len(df), path)
        return path

    def figure(self, fig, name: str) -> Path:
        """Save a matplotlib figure as PDF (for LaTeX) and PNG (for notebooks and the README), resized (aspect
        kept) to the width the paper prints it at (:func:`included_width`)."""
        self.figures_dir.mkdir(parents=True, exist_ok=True)
        w, h = fig.get_size_inches()
        width = included_width(self.name, name) * TEXT_WIDTH_IN
        fig.set_size_inches(width, h * width / w)
        pdf = self.figures_dir / f"{name}.pdf"
        fig.savefig(pdf, bbox_inches="tight")  # tight: a legend placed outside the axes is kept
        fig.savefig(self.figures_dir / f"{name}.png", bbox_inches="tight", dpi=150)
        log.info("figure %s -> %s", name, pdf)
        return pdf

    def macros(self, values: dict[str, Any], digits: int = 1) -> Path:
        """Add numbers as LaTeX macros (``\\name``); names must be letters only (LaTeX rule)."""
        for key, value in values.items():
            if not _MACRO_NAME.match(key):
                raise ValueError(f"macro name {key!r}: LaTeX macro names may only contain letters a-z, A-Z")
            self._macros[key] = fmt(value, digits)
        lines = [f"% generated by notebook {self.name}; do not edit"]
        lines += [rf"\newcommand{{\{k}}}{{{v}}}" for k, v in sorted(self._macros.items())]
        path = self.tables_dir / "macros.tex"
        path.write_text("\n".join(lines) + "\n")
        return path


def git_commit() -> str:
    """Short commit of the working tree, with ``+dirty`` when it has uncommitted changes."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown"


TRAIN_STEP = "train.json"  # build/<profile>/: the last `emlab train --profile` (make runs it before §03)


def record_train_time(profile: str, seconds: float, build_dir: Path | None = None) -> Path:
    """Note the wall time of ``emlab train --profile``, a build step outside the notebooks, for the run-time table."""
    import datetime
    import json

    path = Path(build_dir or ROOT / "build" / profile) / TRAIN_STEP
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"duration": seconds, "end_time": datetime.datetime.now().isoformat()}))
    return path


def notebook_times(profile: str, build_dir: Path | None = None) -> pd.DataFrame:
    """Wall time of each executed notebook's last run, from papermill's own metadata in
    ``build/<profile>/NN_name.ipynb`` (a re-run that reuses cached runs and verdicts is fast), and of the
    last ``emlab train --profile`` (row ``03_organisms (train)``, before the notebook that reuses its runs)."""
    import json

    build = Path(build_dir or ROOT / "build" / profile)
    rows = []
    steps = [(nb.stem, json.loads(nb.read_text()).get("metadata", {}).get("papermill", {}))
             for nb in sorted(build.glob("[0-9][0-9]_*.ipynb"))
             if not nb.name.endswith((".partial.ipynb", ".source.ipynb"))]
    if (build / TRAIN_STEP).exists():
        steps.append(("03_organisms (train)", json.loads((build / TRAIN_STEP).read_text())))
    for name, meta in sorted(steps, key=lambda s: (s[0][:2], "(train)" not in s[0])):
        finished = (meta.get("end_time") or "")[:19].replace("T", " ")
        rows.append({"notebook": name, "wall s": meta.get("duration"), "finished": finished})
    return pd.DataFrame(rows, columns=["notebook", "wall s", "finished"])


def weights_description(model: dict) -> str:
    """How the profile trains, for the title page: 4-bit QLoRA, or the LoRA dtype."""
    if model.get("load_in_4bit"):
        return "4-bit NF4 QLoRA, bf16 compute (fp16 without bf16)"
    dtype = model.get("dtype", "auto")
    return {"auto": "float32 on CPU, bf16 on GPU", "bfloat16": "bf16"}.get(dtype, dtype) + " weights"


def write_build_info(profile: str, base: Path | None = None, build_dir: Path | None = None) -> Path:
    """``paper/generated/build_info.tex``: the line on the title page saying what built this PDF, and
    ``paper/generated/build/runtimes.tex``: each executed notebook's wall time in this profile."""
    from emlab import config

    model = (config.read_profile(profile).get("common") or {}).get("model", {})
    base = Path(base or ROOT)
    path = base / "paper" / "generated" / "build_info.tex"
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_if_changed(path, rf"\newcommand{{\buildProfile}}{{{latex_escape(profile)}}}" "\n"
                      rf"\newcommand{{\buildModel}}{{{latex_escape(model.get('name', '?'))}}}" "\n"
                      rf"\newcommand{{\buildWeights}}{{{latex_escape(weights_description(model))}}}" "\n"
                      rf"\newcommand{{\buildCommit}}{{{latex_escape(git_commit())}}}" "\n")
    times = notebook_times(profile, build_dir)
    total = pd.DataFrame([{"notebook": "total", "wall s": times["wall s"].sum(), "finished": ""}])
    Section("build", base=base).table(
        pd.concat([times, total], ignore_index=True), "runtimes", digits=0,
        caption=f"Wall time of each notebook's last execution and of the training before §03 (make train; "
                f"profile {profile}, {os.cpu_count()} CPU cores visible); a re-run reuses cached training runs, "
                "samples and judge verdicts.")
    return path


def _write_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:  # unchanged content keeps latexmk's mtime check quiet
        path.write_text(text)


if __name__ == "__main__":
    import sys

    write_build_info(sys.argv[1] if len(sys.argv) > 1 else "cpu")
