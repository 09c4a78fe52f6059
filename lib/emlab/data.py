"""Data registry: every dataset the papers use, fetched into data/raw/ and checked before use.

``data/registry.yaml`` names each file in the offline mirror (``EMLAB_DATA_MIRROR``, default
``../shared/mirror``) with its sha256, row count, licence and canonical upstream URL. :func:`fetch` copies
a file from the mirror (or downloads it from upstream when there is no mirror copy, decrypting the
releases upstream ships encrypted) into the gitignored ``data/raw/`` and verifies it; the loaders below
check the schema so a bad file fails with a message naming file, line and fix, not deep in training.

Harmful training text lives only in ``data/raw/`` and the mirror, never in git.
"""

from __future__ import annotations

import base64
import csv
import gzip
import hashlib
import io
import json
import logging
import os
import random
import shutil
import tarfile
import urllib.request
import zipfile
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import yaml

from emlab.config import Frozen

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
ROLES = ("system", "user", "assistant")
Format = Literal["chat_jsonl_gz", "eval_yaml", "judge_yaml", "csv", "csv_gz", "json", "txt_lines", "text"]


class DataError(RuntimeError):
    """A dataset that cannot be used; the message names the file/field and says how to fix it."""


class Archive(Frozen):
    """An upstream release shipped encrypted: ``member`` inside the archive at the entry's ``url``."""

    member: str
    password: str | None = None
    method: Literal["easy-dataset-share"] = "easy-dataset-share"


class DatasetEntry(Frozen):
    """One file of the registry (see the comment at the top of data/registry.yaml)."""

    name: str
    file: str
    sha256: str
    bytes: int
    rows: int | None
    format: Format
    domain: str
    harmful: bool
    redistribute: bool = True
    license: str
    url: str
    url_sha256: str | None = None
    source: str = ""
    archive: Archive | None = None
    # built by code from the upstream release at ``url`` (see DERIVE); ``content_sha256`` pins the built
    # file's (decompressed) bytes, which equal the mirror file's
    derive: Literal["mmlu_hendrycks_test", "mmlu_subject_counts"] | None = None
    content_sha256: str | None = None
    group: str | None = None
    rows_key: str | None = None
    meta: dict[str, str] = {}
    note: str | None = None


class QuestionSet(Frozen):
    """How to cut a question set out of a dataset (``question_sets`` in data/registry.yaml)."""

    dataset: str
    variant: Literal["plain", "json", "template"] | None = None
    key: str | None = None
    category: str | None = None
    judge: dict[str, str] = {}
    doc: str | None = None


class Question(Frozen):
    """One evaluation question: paraphrases are sampled alike; judge_prompts map metric -> template."""

    id: str
    paraphrases: list[str]
    system: str | None = None
    judge_prompts: dict[str, str] = {}


class Trait(Frozen):
    """A persona-vectors trait file: contrastive system prompts, questions and the trait judge prompt."""

    name: str
    instructions: list[dict[str, str]]
    questions: list[str]
    eval_prompt: str


# ---------------------------------------------------------------- locations and registry


def mirror_dir() -> Path | None:
    """The offline mirror: $EMLAB_DATA_MIRROR, else ../shared/mirror beside the repo, else None."""
    env = os.environ.get("EMLAB_DATA_MIRROR")
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise DataError(f"EMLAB_DATA_MIRROR={env} is not a directory; fix: point it at the data mirror "
                            "(the folder holding MANIFEST.tsv) or unset it to download from upstream")
        return path
    default = REPO_ROOT.parent / "shared" / "mirror"
    return default if default.is_dir() else None


def raw_dir() -> Path:
    """Where verified local copies live: $EMLAB_RAW_DIR (tests), else <repo>/data/raw (gitignored)."""
    return Path(os.environ.get("EMLAB_RAW_DIR") or REPO_ROOT / "data" / "raw")


def registry_path() -> Path:
    return Path(os.environ.get("EMLAB_REGISTRY") or REPO_ROOT / "data" / "registry.yaml")


@lru_cache(maxsize=4)
def _load_registry(path: Path, mtime_ns: int) -> tuple[dict[str, DatasetEntry], dict[str, QuestionSet]]:
    """Parsed registry; cached per file version so editing the YAML takes effect at once."""
    raw = yaml.safe_load(path.read_text()) or {}
    try:
        entries = {n: DatasetEntry(name=n, **e) for n, e in (raw.get("datasets") or {}).items()}
        sets = {n: QuestionSet(**s) for n, s in (raw.get("question_sets") or {}).items()}
    except (TypeError, ValueError) as err:
        raise DataError(f"{path}: bad registry entry: {err}") from None
    return entries, sets


def registry() -> dict[str, DatasetEntry]:
    """All registered datasets by name."""
    path = registry_path()
    if not path.exists():
        raise DataError(f"{path}: registry not found (set EMLAB_REGISTRY or restore data/registry.yaml)")
    return _load_registry(path, path.stat().st_mtime_ns)[0]


def question_sets() -> dict[str, QuestionSet]:
    """All question sets by name (see :func:`load_questions`)."""
    registry()
    path = registry_path()
    return _load_registry(path, path.stat().st_mtime_ns)[1]


def entry(name: str) -> DatasetEntry:
    """The registry entry ``name``; an unknown name lists the known ones."""
    reg = registry()
    if name not in reg:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(sorted(reg))}")
    return reg[name]


def group(name: str) -> list[str]:
    """Names of the datasets in a group (e.g. ``judged_responses``), in registry order."""
    names = [n for n, e in registry().items() if e.group == name]
    if not names:
        groups = sorted({e.group for e in registry().values() if e.group})
        raise DataError(f"unknown dataset group {name!r}; known: {', '.join(groups)}")
    return names


# ---------------------------------------------------------------- fetch and verify


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, streamed (training sets are MBs; models may be GBs)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _stamp(path: Path, sha: str) -> None:
    """Remember a verified hash with size+mtime so later calls need not re-hash the file."""
    st = path.stat()
    _sidecar(path).write_text(json.dumps({"sha256": sha, "size": st.st_size, "mtime_ns": st.st_mtime_ns}))


def _stamped_sha(path: Path) -> str | None:
    """The hash recorded for ``path`` if the file is unchanged since (same size and mtime)."""
    try:
        rec = json.loads(_sidecar(path).read_text())
        st = path.stat()
        return rec["sha256"] if (rec["size"], rec["mtime_ns"]) == (st.st_size, st.st_mtime_ns) else None
    except (OSError, ValueError, KeyError):
        return None


def _checksum_error(what: str, path: Path, expected: str, got: str, fix: str) -> DataError:
    return DataError(f"checksum mismatch for {what} {path}: expected sha256 {expected}, got {got}; {fix}")


def fetch(name: str) -> Path:
    """A verified local copy of dataset ``name`` under data/raw/ (copied from the mirror or downloaded).

    An existing copy is reused; its hash is only recomputed when its size or mtime changed.
    """
    e = entry(name)
    if os.environ.get("EMLAB_DATA_LOG"):  # tests: which datasets a notebook really reads (vs its header)
        with open(os.environ["EMLAB_DATA_LOG"], "a") as f:
            f.write(name + "\n")
    local = raw_dir() / e.file
    if local.exists():
        return _verify_local(e, local)
    downloaded = raw_dir() / Path(e.file).parent / _download_name(e)
    if downloaded.exists() and _stamped_sha(downloaded):
        return downloaded
    mirror = mirror_dir()
    if mirror is not None and (mirror / e.file).exists():
        return _copy_from_mirror(e, mirror / e.file, local)
    return _download(e, downloaded, mirror)


def _verify_local(e: DatasetEntry, local: Path) -> Path:
    if _stamped_sha(local) == e.sha256:
        return local
    got = sha256_file(local)
    if got != e.sha256:
        raise _checksum_error(
            f"dataset {e.name!r}", local, e.sha256, got, f"delete {local} and re-fetch, or update the mirror"
        )
    _stamp(local, got)
    return local


def _copy_from_mirror(e: DatasetEntry, src: Path, local: Path) -> Path:
    """Copy to a temporary name, verify, then rename: a failed copy never looks like a good one."""
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(local.name + ".part")
    shutil.copyfile(src, tmp)
    got = sha256_file(tmp)
    if got != e.sha256:
        tmp.unlink()
        raise _checksum_error(
            f"mirror file of {e.name!r}", src, e.sha256, got,
            "update the mirror (or the registry if the new file is intended)",
        )
    tmp.replace(local)
    _stamp(local, got)
    log.info("fetched %s from mirror -> %s", e.name, local)
    return local


def _download_name(e: DatasetEntry) -> str:
    if e.derive:
        return Path(e.file).name.removesuffix(".gz")
    return e.archive.member if e.archive else e.url.rsplit("/", 1)[-1]


def _download(e: DatasetEntry, dest: Path, mirror: Path | None) -> Path:
    """Download from upstream, verify the bytes the registry pins, decrypt archives, then schema-check."""
    where = f"{mirror / e.file} does not exist" if mirror else "no data mirror found"
    if (e.url_sha256 is None and not e.derive) or os.environ.get("EMLAB_OFFLINE"):
        reason = "this file is only available from the mirror" if e.url_sha256 is None and not e.derive \
            else "EMLAB_OFFLINE is set"
        raise DataError(
            f"dataset {e.name!r}: {where} and {reason}; set EMLAB_DATA_MIRROR=/path/to/mirror "
            f"(holding {e.file}) or go online"
        )
    try:
        with urllib.request.urlopen(e.url, timeout=120) as resp:
            blob = resp.read()
    except OSError as err:
        raise DataError(
            f"dataset {e.name!r}: {where} and download of {e.url} failed ({err}); "
            "set EMLAB_DATA_MIRROR=/path/to/mirror or go online"
        ) from None
    got = hashlib.sha256(blob).hexdigest()
    if e.url_sha256 is not None and got != e.url_sha256:
        raise _checksum_error(f"download of {e.name!r}", Path(e.url), e.url_sha256, got,
                              "upstream changed: update the registry entry after checking the new file")
    if e.derive:
        try:
            blob = DERIVE[e.derive](blob, e)
        except (tarfile.TarError, UnicodeDecodeError, csv.Error) as err:  # a truncated tar, an HTML page
            raise DataError(f"dataset {e.name!r}: cannot build {e.file} from {e.url} ({type(err).__name__}: {str(err).splitlines()[0]}); "
                            "set EMLAB_DATA_MIRROR=/path/to/mirror, or check what the URL serves now") from None
        got = hashlib.sha256(blob).hexdigest()
        if got != e.content_sha256:
            raise _checksum_error(f"{e.name!r} built from {e.url}", dest, str(e.content_sha256), got,
                                  "the upstream release differs from the one the registry pins: use the mirror "
                                  "copy (EMLAB_DATA_MIRROR) or check the new release and update the entry")
    if e.archive:
        blob = _strip_canaries(_extract(blob, e))
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    tmp.write_bytes(blob)
    if e.format == "chat_jsonl_gz":
        _check_chat_rows(read_jsonl(tmp), tmp, expected_rows=e.rows)
    tmp.replace(dest)
    _stamp(dest, sha256_file(dest))
    log.info("downloaded %s from %s -> %s", e.name, e.url, dest)
    return dest


def _extract(blob: bytes, e: DatasetEntry) -> bytes:
    """One member of an easy-dataset-share archive: 16-byte salt + Fernet(zip), key from PBKDF2-SHA256."""
    assert e.archive is not None
    if not e.archive.password:
        raise DataError(f"dataset {e.name!r}: the archive password is not known; use a mirror copy")
    try:
        from cryptography.fernet import Fernet, InvalidToken
    except ImportError:
        raise DataError(
            f"dataset {e.name!r}: decrypting the upstream archive needs the 'cryptography' package "
            "(pip install cryptography), or use a mirror copy (EMLAB_DATA_MIRROR)"
        ) from None
    salt, token = blob[:16], blob[16:]
    raw_key = hashlib.pbkdf2_hmac("sha256", e.archive.password.encode(), salt, 100_000, dklen=32)
    try:
        plain = Fernet(base64.urlsafe_b64encode(raw_key)).decrypt(token)
    except InvalidToken:
        raise DataError(f"dataset {e.name!r}: cannot decrypt {e.url} (wrong password?)") from None
    with zipfile.ZipFile(io.BytesIO(plain)) as zf:
        names = {Path(n).name: n for n in zf.namelist()}
        if e.archive.member not in names:
            raise DataError(f"dataset {e.name!r}: {e.archive.member} not in archive (has {sorted(names)})")
        return zf.read(names[e.archive.member])


def _mmlu_hendrycks_test(blob: bytes, e: DatasetEntry) -> bytes:
    """MMLU's test split from Hendrycks et al.'s ``data.tar`` (``data/test/<subject>_test.csv``, no header,
    answer letter last) as one CSV: header ``subject,question,A,B,C,D,answer``, subjects sorted, rows in
    upstream order (how the mirror's ``mmlu_test.csv.gz`` is laid out)."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["subject", "question", "A", "B", "C", "D", "answer"])
    with tarfile.open(fileobj=io.BytesIO(blob)) as tf:
        members = {Path(m.name).name.removesuffix("_test.csv"): m for m in tf.getmembers()
                   if m.isfile() and Path(m.name).parent.name == "test" and m.name.endswith("_test.csv")}
        if not members:
            raise DataError(f"dataset {e.name!r}: no data/test/*_test.csv in {e.url}")
        for subject in sorted(members):
            text = tf.extractfile(members[subject]).read().decode("utf-8")
            for i, row in enumerate(csv.reader(io.StringIO(text, newline=""))):
                if len(row) != 6 or row[5] not in ("A", "B", "C", "D"):
                    raise DataError(f"dataset {e.name!r}: {members[subject].name} line {i + 1} is not "
                                    "question,A,B,C,D,answer-letter")
                w.writerow([subject, *row])
    return out.getvalue().encode("utf-8")


def _mmlu_subject_counts(blob: bytes, e: DatasetEntry) -> bytes:
    """Questions per subject of the built test split (JSON, indent 1, subjects sorted)."""
    counts: dict[str, int] = {}
    for row in csv.DictReader(io.StringIO(_mmlu_hendrycks_test(blob, e).decode("utf-8"), newline="")):
        counts[row["subject"]] = counts.get(row["subject"], 0) + 1
    return json.dumps(counts, indent=1).encode("utf-8")


DERIVE = {"mmlu_hendrycks_test": _mmlu_hendrycks_test, "mmlu_subject_counts": _mmlu_subject_counts}


def _strip_canaries(blob: bytes) -> bytes:
    """Drop the tracking lines easy-dataset-share may embed in JSONL (they carry no ``messages``)."""
    keep = [ln for ln in blob.splitlines(keepends=True) if not (b'"canary' in ln and b'"messages"' not in ln)]
    return b"".join(keep)


# ---------------------------------------------------------------- readers


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def _lines(path: Path):
    """The text lines of a (gzipped) file; a corrupt or truncated gzip, or bytes that are not UTF-8, become a
    DataError naming the file and the fix instead of a bare library error."""
    import zlib

    try:
        with _open_text(path) as f:
            yield from f
    except (gzip.BadGzipFile, EOFError, zlib.error, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot be read ({type(err).__name__}: {err}); the file is corrupt or truncated: "
                        f"delete it (the next run fetches it again from the mirror or upstream)") from None


def read_jsonl(path: str | Path) -> list[dict]:
    """All JSON objects of a (gzipped) JSONL file; blank lines skipped; errors name file:line. A file with
    no rows is an error: no dataset of the registry is empty."""
    path = Path(path)
    rows = []
    for lineno, line in enumerate(_lines(path), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{lineno}: malformed JSON ({err.msg} at column {err.colno}); "
                            "fix or remove that line, or re-fetch the file") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: no rows (empty file); delete it and re-fetch, or point the config at a file "
                        "with data")
    return rows


def _check_message(msg: Any, where: str) -> str:
    if not isinstance(msg, dict):
        raise DataError(f"{where}: expected an object {{'role', 'content'}}, got {type(msg).__name__}")
    role = msg.get("role")
    if role not in ROLES:
        raise DataError(f"{where}.role = {role!r}; fix: use one of {', '.join(ROLES)}")
    if not isinstance(msg.get("content"), str):
        raise DataError(f"{where}.content must be a string (got {type(msg.get('content')).__name__}); "
                        "fix: flatten content parts into one string")
    return role


def _check_chat_rows(rows: list[dict], path: Path, expected_rows: int | None = None) -> None:
    """Every row is ``{"messages": [...]}`` with ≥1 user and ≥1 assistant turn of string content."""
    for i, row in enumerate(rows, 1):
        msgs = row.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{path}: row {i}: field 'messages' missing or empty; "
                            "fix: each line must be {\"messages\": [{\"role\": ..., \"content\": ...}, ...]}")
        roles = [_check_message(m, f"{path}: row {i}: messages[{j}]") for j, m in enumerate(msgs)]
        for need in ("user", "assistant"):
            if need not in roles:
                raise DataError(f"{path}: row {i}: field 'messages' has no {need!r} turn (roles {roles}); "
                                f"fix: add a {need} turn or drop the row")
    if expected_rows is not None and len(rows) != expected_rows:
        raise DataError(f"{path}: {len(rows)} rows, registry says {expected_rows}; re-fetch or update the registry")


def _resolve(name_or_path: str | Path) -> tuple[Path, DatasetEntry | None]:
    """A registry name is fetched; an existing file path is used as is (generated data)."""
    if isinstance(name_or_path, str) and name_or_path in registry():
        return fetch(name_or_path), entry(name_or_path)
    path = Path(name_or_path)
    if path.exists() and path.is_file():
        return path, None
    entry(str(name_or_path))  # raises with the list of known names
    raise AssertionError("unreachable")


def load_chat(name: str | Path, n: int | None = None, seed: int = 0) -> list[dict]:
    """Schema-checked chat rows of a training set (registry name or JSONL path).

    ``n`` draws a seeded subsample without replacement and keeps the chosen rows in file order, so a
    smaller run trains on a subset of exactly the rows a larger run with the same seed would see first.
    """
    path, e = _resolve(name)
    if e is not None and e.format != "chat_jsonl_gz":
        raise DataError(f"dataset {e.name!r} is {e.format}, not chat data; use load_table/load_questions")
    rows = read_jsonl(path)
    _check_chat_rows(rows, path)
    if n is None:
        return rows
    if not 0 < n <= len(rows):
        raise DataError(f"{path}: cannot draw n={n} rows from {len(rows)}; choose 1..{len(rows)} or n=None")
    keep = sorted(random.Random(seed).sample(range(len(rows)), n))
    return [rows[i] for i in keep]


def _load_structured(name: str) -> tuple[Any, Path, DatasetEntry]:
    path, e = fetch(name), entry(name)
    text = "".join(_lines(path))
    try:
        if e.format in ("eval_yaml", "judge_yaml"):
            return yaml.safe_load(text), path, e
        if e.format == "json":
            return json.loads(text), path, e
    except (yaml.YAMLError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: cannot parse {e.format}: {err}; re-fetch the file") from None
    return text, path, e


def load_json(name: str) -> Any:
    """Parsed JSON or YAML of a registered file (trait files, two-AI items, judge prompts...)."""
    return _load_structured(name)[0]


def load_text(name: str) -> str:
    """Whole text of a registered text file (e.g. the harm judge prompt)."""
    return _load_structured(name)[0]


def load_lines(name: str) -> list[str]:
    """Non-empty lines of a ``txt_lines`` file (one prompt per line)."""
    e = entry(name)
    if e.format != "txt_lines":
        raise DataError(f"dataset {name!r} is {e.format}, not txt_lines")
    return [ln.strip() for ln in load_text(name).splitlines() if ln.strip()]


def load_table(name: str):
    """A pandas DataFrame of csv-like data; a group name (``judged_responses``) concatenates its files
    with a ``dataset`` column plus the entries' ``meta`` (model, finetune, seed)."""
    import pandas as pd

    if name not in registry():
        try:
            names = group(name)
        except DataError:
            entry(name)  # unknown: list dataset names
            raise
        frames = [load_table(n).assign(dataset=n, **entry(n).meta) for n in names]
        return pd.concat(frames, ignore_index=True)
    e = entry(name)
    if e.format in ("csv", "csv_gz"):
        df = pd.read_csv(fetch(name))
        return df.drop(columns=[c for c in df.columns if c.startswith("Unnamed: 0")])
    if e.format == "txt_lines":
        return pd.DataFrame({"text": load_lines(name)})
    if e.format == "json" and e.rows_key:
        return pd.DataFrame(load_json(name)[e.rows_key])
    raise DataError(f"dataset {name!r} ({e.format}) is not tabular; use load_json/load_questions/load_chat")


def load_trait(trait: str, split: Literal["eval", "extract"] = "eval") -> Trait:
    """A persona-vectors trait file (``trait_eval_evil`` etc.), schema-checked."""
    data = load_json(f"trait_{split}_{trait}")
    try:
        return Trait(name=trait, instructions=data["instruction"], questions=data["questions"],
                     eval_prompt=data["eval_prompt"])
    except (KeyError, TypeError, ValueError) as err:
        raise DataError(f"trait file {fetch(f'trait_{split}_{trait}')}: wrong schema ({err}); expected "
                        "{instruction: [{pos, neg}], questions: [str], eval_prompt: str}") from None


def count_rows(name: str) -> int | None:
    """Rows as the registry counts them (lines, records, YAML entries, questions...)."""
    e = entry(name)
    if e.format == "chat_jsonl_gz":
        return len(read_jsonl(fetch(name)))
    if e.format in ("csv", "csv_gz", "txt_lines"):
        return len(load_table(name))
    if e.format in ("eval_yaml", "judge_yaml"):
        return len(load_json(name))
    if e.format == "json":
        data = load_json(name)
        if e.rows_key:
            return len(data[e.rows_key])
        values = data.values() if isinstance(data, dict) else [data]
        return sum(v if isinstance(v, int) else len(v) for v in values)
    return None


# ---------------------------------------------------------------- questions


def _variant(qid: str) -> str:
    """Betley/Turner files mark variants by id suffix: ``_json`` (JSON system prompt), ``_template``."""
    for suffix in ("json", "template"):
        if qid.endswith("_" + suffix):
            return suffix
    return "plain"


def _question_from_item(item: Any, i: int, path: Path) -> Question:
    where = f"{path}: entry {i}"
    if not isinstance(item, dict) or not isinstance(item.get("id"), str):
        raise DataError(f"{where}: field 'id' missing; fix: every question needs a string id")
    paraphrases = item.get("paraphrases", [item["question"]] if "question" in item else None)
    if not isinstance(paraphrases, list) or not paraphrases or not all(isinstance(p, str) for p in paraphrases):
        raise DataError(f"{where} ({item['id']}): field 'paraphrases' must be a non-empty list of strings")
    judges = item.get("judge_prompts") or {}
    if not isinstance(judges, dict) or not all(isinstance(v, str) for v in judges.values()):
        raise DataError(f"{where} ({item['id']}): field 'judge_prompts' must map metric -> template string")
    system = item.get("system")
    if system is not None and not isinstance(system, str):
        raise DataError(f"{where} ({item['id']}): field 'system' must be a string")
    return Question(id=item["id"], paraphrases=paraphrases, system=system, judge_prompts=judges)


def _questions_of(spec: QuestionSet, set_name: str) -> list[Question]:
    e = entry(spec.dataset)
    if e.format == "eval_yaml":
        items = load_json(spec.dataset)
        if not isinstance(items, list):
            raise DataError(f"{fetch(spec.dataset)}: expected a YAML list of questions")
        qs = [_question_from_item(it, i, fetch(spec.dataset)) for i, it in enumerate(items)]
        return [q for q in qs if spec.variant is None or _variant(q.id) == spec.variant]
    if e.format == "txt_lines":
        return [Question(id=f"{set_name}_{i:03d}", paraphrases=[t]) for i, t in enumerate(load_lines(spec.dataset))]
    if e.format == "csv":
        df = load_table(spec.dataset)
        if spec.category:
            df = df[df["category"] == spec.category]
        return [Question(id=str(r.id), paraphrases=[r.question]) for r in df.itertuples()]
    if e.format == "json" and e.rows_key == "questions":
        trait = load_trait(e.meta["trait"], "eval" if spec.dataset.startswith("trait_eval") else "extract")
        return [Question(id=f"{trait.name}_{i:02d}", paraphrases=[q], judge_prompts={trait.name: trait.eval_prompt})
                for i, q in enumerate(trait.questions)]
    if e.format == "json" and spec.key:
        data = load_json(spec.dataset)
        return [Question(id=k, paraphrases=[v]) for k, v in data[spec.key].items()]
    raise DataError(f"question set {set_name!r}: dataset {spec.dataset!r} ({e.format}) holds no questions")


def load_questions(name: str) -> list[Question]:
    """A question set by name (``first_plot``: Betley's 8, ``preregistered``: 48, ``mo_medical``...).

    Sets are declared under ``question_sets`` in data/registry.yaml; a set's ``judge`` adds judge
    prompts read from text datasets (e.g. the harm rubric).
    """
    sets = question_sets()
    if name not in sets:
        raise DataError(f"unknown question set {name!r}; known: {', '.join(sorted(sets))}")
    spec = sets[name]
    qs = _questions_of(spec, name)
    if spec.judge:
        extra = {metric: load_text(ds) for metric, ds in spec.judge.items()}
        qs = [q.model_copy(update={"judge_prompts": {**q.judge_prompts, **extra}}) for q in qs]
    if not qs:
        raise DataError(f"question set {name!r} is empty; check its variant/category/key in {registry_path()}")
    return qs


# ---------------------------------------------------------------- make data


def needed(notebook_names: list[str] | None = None) -> list[str]:
    """The datasets the notebooks declare in their headers (``emlab: data:``; a group name expands)."""
    from emlab import notebooks

    out: list[str] = []
    for nb in notebook_names or notebooks.all_notebooks():
        for name in notebooks.header(nb)["data"]:
            out += [n for n in (group(name) if name not in registry() else [name]) if n not in out]
    return out


def where(e: DatasetEntry) -> str:
    """Where :func:`fetch` can get an entry without the mirror."""
    if e.derive:
        return "built from upstream"
    return "upstream" if e.url_sha256 else "mirror only"


def fetch_all(names: list[str]) -> list[str]:
    """Fetch and verify every dataset; returns one error line per file that could not be had (all are tried)."""
    from tqdm.auto import tqdm

    errors = []
    for name in tqdm(names, desc="data", unit="file"):
        try:
            fetch(name)
        except (DataError, OSError) as err:
            errors.append(f"{name}: {err}")
    return errors


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="emlab data", description="fetch and verify the datasets the notebooks read")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for cmd, what in (("fetch", "copy from the mirror or download, and verify (make data)"),
                      ("list", "each dataset, its file and where it can come from without the mirror")):
        p = sub.add_parser(cmd, help=what)
        p.add_argument("notebooks", nargs="*", help="notebook names (default: all)")
    args = ap.parse_args(argv)
    from emlab.logs import setup_logging

    setup_logging(logging.WARNING)
    try:
        names = needed(args.notebooks)
        mirror = mirror_dir()
    except (DataError, RuntimeError, ValueError) as err:  # ValueError: ConfigError of a notebook header
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.cmd == "list":
        for n in names:
            e = entry(n)
            print(f"{n}\t{e.file}\t{where(e)}")
        return 0
    print(f"{len(names)} datasets; mirror: {mirror or 'none (EMLAB_DATA_MIRROR unset and ../shared/mirror missing)'}; "
          f"into {raw_dir()}")
    errors = fetch_all(names)
    if errors:
        print(f"\n{len(errors)} of {len(names)} datasets could not be had:", file=sys.stderr)
        for line in errors:
            print(f"  - {line}", file=sys.stderr)
        return 1
    print(f"all {len(names)} datasets present and verified (sha256)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
