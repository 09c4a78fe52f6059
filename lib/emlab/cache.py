"""Caches: the stage versions every cached artifact is keyed by, and the judge's verdict store.

Stage versions. A trained run, an answer set, a verdict or a derived data set is reused only while its key
matches, and every key includes the version of the stage that made it (:data:`STAGE_VERSIONS`,
:func:`stage_key`). Bump a stage's number in the change that alters what the stage produces (a refactor that
keeps outputs bitwise keeps it): its artifacts, and everything keyed on them, are rebuilt instead of
silently reused. Answers are keyed by their run directory, so a ``train`` bump re-samples too.

Judge cache: one SQLite file (WAL) shared by every notebook, so re-running ``make all`` makes no new
judge calls.

A verdict is keyed by (judge id, prompt version, metric, sha256(question, answer)). Only hashes of
the texts are stored (answers may be harmful text; the cache need not hold them), and never API keys,
headers or endpoints. Writes are committed per batch, so a crash loses at most the batch in flight;
WAL + a busy timeout let several processes (``make -j``) share the file.

Location: ``$EMLAB_CACHE/judge.sqlite`` (the directory emlab.models also caches into), default
``<repo>/build/cache/judge.sqlite``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Iterable

REPO_ROOT = Path(__file__).resolve().parents[2]

# Bump when the stage's output changes (see the module docstring); README "Caches" says what each holds.
STAGE_VERSIONS: dict[str, int] = {
    "train": 2,    # build/runs/: trained organisms (emlab.train)
    "sample": 2,   # build/answers/: answers and MMLU letter scores (emlab.sample.answers, emlab.mmlu)
    "judge": 2,    # judge.sqlite verdicts (with each metric's prompt version)
    "data": 2,     # data/derived/: teacher-written and paired training sets (emlab.persona_data)
}


def stage_key(stage: str, *parts: Any, n: int = 16) -> str:
    """Short hash of ``parts`` and the code version of ``stage``: the name of a cached artifact."""
    blob = json.dumps([stage, STAGE_VERSIONS[stage], *parts], sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:n]

SCHEMA = """
CREATE TABLE IF NOT EXISTS verdicts (
    judge TEXT NOT NULL,
    prompt_version TEXT NOT NULL,
    metric TEXT NOT NULL,
    item TEXT NOT NULL,          -- sha256 of question + NUL + answer
    value REAL,                  -- the score, NULL when the judge gave none
    label TEXT,                  -- CODE / REFUSAL / UNPARSED ..., NULL for a plain score
    raw TEXT,                    -- JSON: what the score was computed from (top tokens, mass)
    created REAL NOT NULL,
    PRIMARY KEY (judge, prompt_version, metric, item)
) WITHOUT ROWID;
"""


def default_path() -> Path:
    """``$EMLAB_CACHE/judge.sqlite``, else ``<repo>/build/cache/judge.sqlite``."""
    root = Path(os.environ.get("EMLAB_CACHE") or REPO_ROOT / "build" / "cache").expanduser()
    return root / "judge.sqlite"


def item_key(question: str, answer: str) -> str:
    return hashlib.sha256(question.encode() + b"\0" + answer.encode()).hexdigest()


class JudgeCache:
    """Verdict store. Thread-safe (one connection behind a lock); open one per process."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else default_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(self.path, timeout=60, check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across process crashes
        self._conn.execute("PRAGMA busy_timeout=60000")
        self._conn.executescript(SCHEMA)

    def get_many(self, judge: str, version: str, metric: str, keys: Iterable[str]) -> dict[str, tuple]:
        """``{item_key: (value, label, raw_dict)}`` for the keys that are cached."""
        keys = list(dict.fromkeys(keys))
        out: dict[str, tuple] = {}
        with self._lock:
            for i in range(0, len(keys), 500):  # stay under SQLite's host-parameter limit
                chunk = keys[i:i + 500]
                marks = ",".join("?" * len(chunk))
                rows = self._conn.execute(
                    f"SELECT item, value, label, raw FROM verdicts WHERE judge=? AND prompt_version=? "
                    f"AND metric=? AND item IN ({marks})", (judge, version, metric, *chunk)).fetchall()
                for item, value, label, raw in rows:
                    out[item] = (value, label, json.loads(raw) if raw else None)
        return out

    def put_many(self, judge: str, version: str, metric: str, rows: Iterable[tuple[str, Any, Any, Any]]) -> None:
        """Store ``(item_key, value, label, raw)`` rows in one transaction."""
        now = time.time()
        data = [(judge, version, metric, key, None if value is None else float(value), label,
                 json.dumps(raw, sort_keys=True, default=str) if raw is not None else None, now)
                for key, value, label, raw in rows]
        if not data:
            return
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.executemany("INSERT OR REPLACE INTO verdicts VALUES (?,?,?,?,?,?,?,?)", data)
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    def count(self, judge: str | None = None) -> int:
        with self._lock:
            if judge is None:
                return self._conn.execute("SELECT COUNT(*) FROM verdicts").fetchone()[0]
            return self._conn.execute("SELECT COUNT(*) FROM verdicts WHERE judge=?", (judge,)).fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> "JudgeCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
