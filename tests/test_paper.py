"""emlab.paper: tables, figures and macros land where the LaTeX expects them, in valid LaTeX."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from emlab import paper  # noqa: E402


def test_table_writes_csv_and_escaped_latex(tmp_path):
    out = paper.Section("99_test", base=tmp_path)
    df = pd.DataFrame({"dataset": ["bad_medical", "a&b"], "EM %": [12.345, float("nan")], "rows": [7049, 6000]})
    out.table(df, "t", caption="A caption")
    tex = (tmp_path / "paper/generated/99_test/t.tex").read_text()
    assert r"bad\_medical" in tex and r"a\&b" in tex and r"EM \%" in tex
    assert "12.3" in tex and "--" in tex and "7{,}049" in tex
    assert r"\label{tab:99_test:t}" in tex
    assert pd.read_csv(tmp_path / "paper/generated/99_test/t.csv").shape == (2, 3)


def test_figure_pdf_and_png(tmp_path):
    out = paper.Section("99_test", base=tmp_path)
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    out.figure(fig, "f")
    assert (tmp_path / "figures/99_test/f.pdf").stat().st_size > 0
    assert (tmp_path / "figures/99_test/f.png").read_bytes()[:4] == b"\x89PNG"


def test_macros_accumulate_and_reject_bad_names(tmp_path):
    out = paper.Section("99_test", base=tmp_path)
    out.macros({"emRate": 0.1234}, digits=2)
    out.macros({"nRows": 7049})
    text = (tmp_path / "paper/generated/99_test/macros.tex").read_text()
    assert r"\newcommand{\emRate}{0.12}" in text and r"\newcommand{\nRows}{7{,}049}" in text
    with pytest.raises(ValueError, match="letters"):
        out.macros({"em_rate2": 1})


def test_output_root_env(tmp_path, monkeypatch):
    monkeypatch.setenv("EMLAB_OUTPUT_ROOT", str(tmp_path))
    assert paper.Section("99_test").figures_dir == tmp_path / "figures" / "99_test"


def test_build_info_names_profile_model_commit(tmp_path):
    path = paper.write_build_info("cpu", base=tmp_path, build_dir=tmp_path / "empty")
    text = path.read_text()
    assert r"\buildProfile}{cpu}" in text and "SmolLM2" in text and r"\buildCommit" in text
    assert r"\buildWeights}{float32 weights}" in text
    for profile, says in (("gpu", "4-bit NF4 QLoRA"), ("paper", "bf16 weights")):
        assert says in paper.write_build_info(profile, base=tmp_path / profile, build_dir=tmp_path / "empty").read_text()


def test_runtimes_table_reads_papermill_metadata(tmp_path):
    import json

    runs = tmp_path / "build" / "cpu"
    runs.mkdir(parents=True)
    for name, sec in [("01_datasets", 12.4), ("03_organisms", 300.0)]:
        meta = {"papermill": {"duration": sec, "end_time": "2026-11-23T17:00:00.123456"}}
        (runs / f"{name}.ipynb").write_text(json.dumps({"metadata": meta, "cells": []}))
    (runs / "04_phase_transition.partial.ipynb").write_text("{}")  # an interrupted run is not a time
    times = paper.notebook_times("cpu", runs)
    assert times.notebook.tolist() == ["01_datasets", "03_organisms"]
    assert times["wall s"].tolist() == [12.4, 300.0] and times.finished[0] == "2026-11-23 17:00:00"
    paper.record_train_time("cpu", 1000.0, runs)  # make train, before §03: counted in the build's time
    times = paper.notebook_times("cpu", runs)
    assert times.notebook.tolist() == ["01_datasets", "03_organisms (train)", "03_organisms"]
    paper.write_build_info("cpu", base=tmp_path, build_dir=runs)
    tex = (tmp_path / "paper/generated/build/runtimes.tex").read_text()
    assert r"03\_organisms & 300" in tex and "total & 1312" in tex and r"\label{tab:build:runtimes}" in tex


def test_captions_escape_run_time_names_but_keep_latex():
    from emlab.paper import caption_text

    assert caption_text("bad_medical_advice/rank1 at 50% & #3") == r"bad\_medical\_advice/rank1 at 50\% \& \#3"
    assert caption_text(r"$\lambda_1$ and 5\% of \texttt{x\_y}") == r"$\lambda_1$ and 5\% of \texttt{x\_y}"


def test_tables_scale_down_only_and_wide_ones_split(tmp_path):
    import pandas as pd

    sec = paper.Section("t", base=tmp_path)
    small = sec.table(pd.DataFrame({"model": ["a"], "EM %": [1.0]}), "small", "Small.").read_text()
    assert r"\resizebox" not in small and r"\begin{adjustbox}{max width=\linewidth}" in small
    wide = pd.DataFrame({"method": ["m"], "family": ["f"], **{f"metric {i}": [float(i)] for i in range(11)}})
    tex = sec.table(wide, "wide", "Wide.").read_text()
    heads = [ln for ln in tex.splitlines() if ln.startswith("method & family")]
    assert len(heads) == 2 and all(h.count("&") <= paper.MAX_COLUMNS - 1 for h in heads)
    assert "metric 0" in heads[0] and "metric 10" in heads[1] and tex.count(r"\label{") == 1


def test_interactive_kernels_write_to_scratch_not_to_the_paper(tmp_path, monkeypatch):
    import sys
    import types

    monkeypatch.delenv("EMLAB_OUTPUT_ROOT", raising=False)
    monkeypatch.setattr(paper, "INTERACTIVE_ROOT", tmp_path / "scratch")
    monkeypatch.setattr(paper, "ROOT", tmp_path / "repo")
    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
    monkeypatch.delenv("EMLAB_HEADLESS", raising=False)
    assert paper.Section("s").tables_dir == tmp_path / "scratch" / "paper" / "generated" / "s"  # Lab / Colab
    monkeypatch.setenv("EMLAB_HEADLESS", "1")
    assert paper.Section("s").tables_dir == tmp_path / "repo" / "paper" / "generated" / "s"  # Make's runs


def test_pipes_and_comparisons_print_as_themselves():
    """OT1 fonts turned `|EM err|` into em dashes and `>= 0.95` into an inverted question mark."""
    assert paper.latex_escape("max |EM err| >= 3 < 4") == r"max \textbar{}EM err\textbar{} \textgreater{}= 3 \textless{} 4"
    assert paper.fmt(">= 0.95") == r"\textgreater{}= 0.95"


def test_model_text_in_any_script_builds():
    """A cold cpu run's PDF failed on one answer holding U+0090: control characters go, other spaces become
    spaces, a character the preamble cannot print is named, accents and declared symbols stay."""
    assert paper.latex_escape("a\x90b\u200b c\u2028d\u00a0e\tf") == "ab c d e f"
    assert paper.latex_escape("你 😀") == "[U+4F60] [U+1F600]"
    assert paper.latex_escape("café “naïve” — ≤ 5%") == r"café “naïve” — ≤ 5\%"


def test_declared_symbols_match_the_preamble():
    """The non-Latin-1 symbols latex_escape keeps are exactly those main.tex declares with \\newunicodechar."""
    import re

    declared = set(re.findall(r"\\newunicodechar\{(.)\}", (paper.ROOT / "paper" / "main.tex").read_text()))
    kept = {c for c in paper._TEX_UNICODE if ord(c) > 0x17F and c not in "‘’“”–—…•€"}
    assert declared and kept == declared


def test_figures_are_saved_at_their_printed_width(tmp_path):
    """A figure the paper includes at 0.48 of the line is saved 0.48 x 6.5 in wide, so its 8 pt text prints
    at 8 pt (not 4-5 pt after LaTeX shrinks a 6-8 in figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = paper.Section("03_organisms", base=tmp_path)
    assert paper.included_width("03_organisms", "em_vs_coherence") == 0.48
    assert paper.included_width("08_persona_prompts", "compliance") == 1.0  # width=\linewidth
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot([0, 1], [0, 1])
    out.figure(fig, "em_vs_coherence")
    w, h = fig.get_size_inches()
    assert w == pytest.approx(0.48 * paper.TEXT_WIDTH_IN) and h == pytest.approx(w / 2)
    assert plt.rcParams["font.size"] == paper.FONT_PT


def test_one_colour_per_family_and_distinct_spares():
    pal = paper.palette(["base", "bad_medical_advice/rank1", "bad_medical_advice/lora_r32", "EM organism",
                         "trigger organism", "Qwen2.5-32B", "evil/health"])
    assert pal["bad_medical_advice/rank1"] == pal["bad_medical_advice/lora_r32"] == pal["Qwen2.5-32B"] == "C0"
    assert pal["EM organism"] != pal["trigger organism"] and pal["evil/health"] == "C3"
