"""One logging and progress set-up for the command line and the notebooks.

``setup_logging()`` sends emlab's log lines (and the libraries' warnings) to stderr with a time stamp, once,
so they reach the make log and the notebook's output alike. Headless runs (``EMLAB_HEADLESS=1``, set by
``emlab.notebooks run`` for its papermill kernel) also get plain-text progress bars: tqdm's notebook widgets
print as ``<IPython.core.display.HTML object>`` in a log. ``import emlab`` applies both when headless,
before any module has imported ``tqdm.auto``.
"""

from __future__ import annotations

import logging
import os
import sys

FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


def setup_logging(level: int = logging.INFO) -> None:
    """Configure logging once (idempotent); plain-text progress bars when headless."""
    root = logging.getLogger()
    if not any(getattr(h, "_emlab", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler._emlab = True  # type: ignore[attr-defined]
        handler.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
        root.addHandler(handler)
    root.setLevel(logging.WARNING)  # third-party chatter stays at warnings
    logging.getLogger("emlab").setLevel(level)
    logging.getLogger("__main__").setLevel(level)
    if headless():
        import tqdm.auto
        import tqdm.std

        tqdm.auto.tqdm = tqdm.std.tqdm  # modules imported from here on get text bars


def busy_cores(seconds: float = 0.2) -> float | None:
    """How many cores other processes keep busy right now (from /proc/stat over ``seconds``); None where
    /proc/stat does not exist."""
    import time

    def snap():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]  # total, idle + iowait

    try:
        t0, i0 = snap()
        time.sleep(seconds)
        t1, i1 = snap()
    except (OSError, ValueError, IndexError):
        return None
    return (1 - (i1 - i0) / max(t1 - t0, 1)) * (os.cpu_count() or 1)


def choose_wait_policy() -> str | None:
    """OMP_WAIT_POLICY=PASSIVE when another process already keeps a core busy, before torch starts its
    threads. torch's OpenMP threads spin-wait by default: beside one busy process on 2 cores, sampling ran
    4.6x slower than quiet, 1.5x with PASSIVE; but PASSIVE costs 1.3x when the machine is quiet
    (`python -m emlab.bench contention`). A policy the user set is kept. Returns the policy chosen."""
    if "OMP_WAIT_POLICY" in os.environ or "torch" in sys.modules:
        return None
    busy = busy_cores()
    if busy is not None and busy > 0.5:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        return "PASSIVE"
    return None


def headless() -> bool:
    return os.environ.get("EMLAB_HEADLESS", "").lower() in ("1", "true", "yes")
