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


def headless() -> bool:
    return os.environ.get("EMLAB_HEADLESS", "").lower() in ("1", "true", "yes")
