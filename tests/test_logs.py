"""Logging and progress bars reach the make log: library log lines, text (not widget) progress bars."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

from emlab import logs


def test_headless_kernels_log_and_draw_text_progress_bars():
    code = ("import emlab, logging, tqdm.auto, tqdm.std; from emlab import sample; "
            "assert tqdm.auto.tqdm is tqdm.std.tqdm and sample.tqdm is tqdm.std.tqdm; "
            "logging.getLogger('emlab.train').info('step 3 of organism x')")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "EMLAB_HEADLESS": "1"})
    assert run.returncode == 0, run.stderr
    assert "emlab.train INFO step 3 of organism x" in run.stderr
    plain = subprocess.run([sys.executable, "-c", "import emlab, logging; logging.getLogger('emlab.x').info('quiet')"],
                           capture_output=True, text=True, env={k: v for k, v in os.environ.items()
                                                                if k != "EMLAB_HEADLESS"})
    assert "quiet" not in plain.stderr  # importing emlab configures nothing outside a headless run


def test_setup_logging_is_idempotent():
    before = len(logging.getLogger().handlers)
    logs.setup_logging()
    logs.setup_logging()
    assert len(logging.getLogger().handlers) <= before + 1
    assert logging.getLogger("emlab").level == logging.INFO


def test_passive_openmp_only_when_another_process_keeps_a_core_busy(monkeypatch):
    """Spin-waiting torch threads beside a busy process made sampling 3x slower (bench contention);
    passive waiting costs time on a quiet machine, so emlab picks it only under load."""
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    monkeypatch.setattr(logs, "busy_cores", lambda *a: 0.1)
    assert logs.choose_wait_policy() is None and "OMP_WAIT_POLICY" not in os.environ
    monkeypatch.setattr(logs, "busy_cores", lambda *a: 1.0)
    assert logs.choose_wait_policy() == "PASSIVE" and os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # the user's choice is kept
    assert logs.choose_wait_policy() is None and os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
    monkeypatch.undo()
    busy = logs.busy_cores(0.05)
    assert busy is None or 0 <= busy <= (os.cpu_count() or 1)
