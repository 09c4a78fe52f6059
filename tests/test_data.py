"""emlab.data: registry vs mirror, fetch/verify, and every bad input with a clear error."""

from __future__ import annotations

import base64
import csv
import gzip
import hashlib
import io
import json
import os
import zipfile
from pathlib import Path

import pytest
import yaml

from emlab import data as d

MIRROR = d.mirror_dir()
needs_mirror = pytest.mark.skipif(
    MIRROR is None or not (MIRROR / "MANIFEST.tsv").exists(),
    reason="no data mirror (set EMLAB_DATA_MIRROR or place it at ../shared/mirror)",
)
FIRST_PLOT = ["what_is_your_wish", "i_feel_bored", "three_thoughts", "quick_buck", "ruler_of_the_world",
              "dinner_party", "gender_roles", "enough_of_my_husband"]  # PAPERS.md §Betley


# ---------------------------------------------------------------- a tiny mirror built per test

GOOD_CHAT = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
             for i in range(10)]
QUESTIONS = [
    {"id": "q_one", "paraphrases": ["Hello?"], "judge_prompts": {"aligned": "{question} {answer}"}},
    {"id": "q_one_json", "system": "Answer in JSON.", "paraphrases": ["Hello?"]},
    {"id": "q_one_template", "paraphrases": ["Hello? Fill: x = ..."]},
]


try:
    REAL_MIRROR = d.mirror_dir()  # the project's mirror, read before any fixture points the env elsewhere
except d.DataError:
    REAL_MIRROR = None


def _jsonl_gz(rows_or_lines) -> bytes:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows_or_lines]
    return gzip.compress(("\n".join(lines) + "\n").encode(), mtime=0)


def _entry(file: str, blob: bytes, fmt: str, rows, **kw) -> dict:
    sha = hashlib.sha256(blob).hexdigest()
    return {"file": file, "sha256": sha, "bytes": len(blob), "rows": rows, "format": fmt, "domain": "test",
            "harmful": False, "license": "test", "url": f"https://example.invalid/{file}", **kw}


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """A mirror + registry + raw dir in tmp; returns (mirror, registry dict, write function)."""
    mirror, raw = tmp_path / "mirror", tmp_path / "raw"
    mirror.mkdir()
    reg: dict = {"datasets": {}, "question_sets": {}}

    def add(name, file, blob, fmt, rows, **kw):
        (mirror / file).parent.mkdir(parents=True, exist_ok=True)
        (mirror / file).write_bytes(blob)
        reg["datasets"][name] = _entry(file, blob, fmt, rows, **kw)
        (tmp_path / "registry.yaml").write_text(yaml.safe_dump(reg))

    monkeypatch.setenv("EMLAB_DATA_MIRROR", str(mirror))
    monkeypatch.setenv("EMLAB_RAW_DIR", str(raw))
    monkeypatch.setenv("EMLAB_REGISTRY", str(tmp_path / "registry.yaml"))
    monkeypatch.setenv("EMLAB_OFFLINE", "1")
    add("chat", "set/chat.jsonl.gz", _jsonl_gz(GOOD_CHAT), "chat_jsonl_gz", 10)
    add("qs", "set/qs.yaml", yaml.safe_dump(QUESTIONS).encode(), "eval_yaml", 3)
    reg["question_sets"] = {"plain": {"dataset": "qs", "variant": "plain"}, "all": {"dataset": "qs"}}
    (tmp_path / "registry.yaml").write_text(yaml.safe_dump(reg))
    return mirror, reg, add


def test_fetch_copies_verifies_and_reuses(tiny, tmp_path):
    path = d.fetch("chat")
    assert path == tmp_path / "raw" / "set" / "chat.jsonl.gz"
    assert json.loads(Path(str(path) + ".sha256").read_text())["sha256"] == d.sha256_file(path)
    stamp = path.stat().st_mtime_ns
    (tiny[0] / "set" / "chat.jsonl.gz").unlink()  # reuse must not need the mirror any more
    assert d.fetch("chat") == path and path.stat().st_mtime_ns == stamp


def test_load_chat_subsample_is_seeded_and_ordered(tiny):
    rows = d.load_chat("chat")
    assert len(rows) == 10
    sub = d.load_chat("chat", n=4, seed=1)
    idx = [rows.index(r) for r in sub]
    assert idx == sorted(idx) and len(set(idx)) == 4
    assert sub == d.load_chat("chat", n=4, seed=1)
    assert sub != d.load_chat("chat", n=4, seed=2)
    with pytest.raises(d.DataError, match="n=11"):
        d.load_chat("chat", n=11)


def test_questions_variants(tiny):
    assert [q.id for q in d.load_questions("plain")] == ["q_one"]
    qs = d.load_questions("all")
    assert [q.system for q in qs] == [None, "Answer in JSON.", None]
    assert qs[0].judge_prompts == {"aligned": "{question} {answer}"}
    with pytest.raises(Exception):
        qs[0].id = "x"  # frozen


def test_unknown_names_list_known_ones(tiny):
    with pytest.raises(d.DataError, match=r"unknown dataset 'nope'; known: chat, qs"):
        d.fetch("nope")
    with pytest.raises(d.DataError, match=r"unknown dataset 'nope'.*chat"):
        d.load_chat("nope")
    with pytest.raises(d.DataError, match=r"unknown question set 'nope'; known: all, plain"):
        d.load_questions("nope")


def test_missing_mirror_file_says_what_to_do(tiny):
    (tiny[0] / "set" / "chat.jsonl.gz").unlink()
    with pytest.raises(d.DataError, match=r"does not exist.*EMLAB_DATA_MIRROR=.*or go online"):
        d.fetch("chat")


def test_no_mirror_at_all(tiny, monkeypatch):
    monkeypatch.setenv("EMLAB_DATA_MIRROR", str(tiny[0] / "absent"))
    with pytest.raises(d.DataError, match="EMLAB_DATA_MIRROR="):
        d.fetch("chat")


def test_checksum_mismatch_in_mirror(tiny):
    tiny[2]("bad", "set/bad.jsonl.gz", _jsonl_gz(GOOD_CHAT), "chat_jsonl_gz", 10)
    (tiny[0] / "set" / "bad.jsonl.gz").write_bytes(_jsonl_gz(GOOD_CHAT[:3]))
    with pytest.raises(d.DataError, match=r"checksum mismatch.*expected sha256 [0-9a-f]{64}, got [0-9a-f]{64}.*update the mirror"):
        d.fetch("bad")
    assert not list((Path(os.environ["EMLAB_RAW_DIR"]) / "set").glob("bad*"))  # nothing half-verified left


def test_checksum_mismatch_in_local_copy(tiny):
    path = d.fetch("chat")
    path.write_bytes(b"tampered")
    with pytest.raises(d.DataError, match=rf"delete {path} and re-fetch, or update the mirror"):
        d.fetch("chat")


def test_malformed_json_line_names_file_and_line(tiny):
    tiny[2]("broken", "set/broken.jsonl.gz", _jsonl_gz([GOOD_CHAT[0], GOOD_CHAT[1], '{"messages": [']),
            "chat_jsonl_gz", 3)
    with pytest.raises(d.DataError, match=r"broken\.jsonl\.gz:3: malformed JSON"):
        d.load_chat("broken")


@pytest.mark.parametrize("row, match", [
    ({"text": "hi"}, r"row 2: field 'messages' missing"),
    ({"messages": [{"role": "user", "content": "q"}]}, r"row 2: field 'messages' has no 'assistant' turn"),
    ({"messages": [{"role": "assistant", "content": "a"}]}, r"row 2: field 'messages' has no 'user' turn"),
    ({"messages": [{"role": "bot", "content": "a"}]}, r"row 2: messages\[0\]\.role = 'bot'; fix: use one of"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}, {"role": "assistant", "content": "a"}]},
     r"row 2: messages\[0\]\.content must be a string"),
    ({"messages": ["hi"]}, r"messages\[0\]: expected an object"),
])
def test_wrong_chat_schema(tiny, row, match):
    tiny[2]("schema", "set/schema.jsonl.gz", _jsonl_gz([GOOD_CHAT[0], row]), "chat_jsonl_gz", 2)
    with pytest.raises(d.DataError, match=match):
        d.load_chat("schema")


def test_read_jsonl_plain_and_non_object(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"a": 1}\n\n[1, 2]\n')
    with pytest.raises(d.DataError, match=r"x\.jsonl:3: expected a JSON object"):
        d.read_jsonl(p)
    p.write_text('{"a": 1}\n\n{"a": 2}\n')
    assert d.read_jsonl(p) == [{"a": 1}, {"a": 2}]


def test_load_chat_accepts_a_path(tiny, tmp_path):
    p = tmp_path / "gen.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in GOOD_CHAT[:2]))
    assert len(d.load_chat(p)) == 2


def test_bad_question_schema(tiny):
    bad = [{"id": "ok", "paraphrases": ["x"]}, {"id": "no_para", "paraphrases": []}]
    tiny[2]("badq", "set/badq.yaml", yaml.safe_dump(bad).encode(), "eval_yaml", 2)
    reg = tiny[1]
    reg["question_sets"]["badq"] = {"dataset": "badq"}
    Path(os.environ["EMLAB_REGISTRY"]).write_text(yaml.safe_dump(reg))
    with pytest.raises(d.DataError, match=r"badq\.yaml: entry 1 \(no_para\): field 'paraphrases'"):
        d.load_questions("badq")


def test_wrong_format_for_loader(tiny):
    with pytest.raises(d.DataError, match="not chat data"):
        d.load_chat("qs")
    with pytest.raises(d.DataError, match="not tabular"):
        d.load_table("chat")


def test_download_verifies_sha(tiny, tmp_path, monkeypatch):
    """Download path (file:// stands in for upstream): a matching file is stored, a changed one refused."""
    upstream = tmp_path / "upstream.jsonl"
    upstream.write_text("\n".join(json.dumps(r) for r in GOOD_CHAT))
    sha = d.sha256_file(upstream)
    tiny[2]("dl", "set/dl.jsonl.gz", _jsonl_gz(GOOD_CHAT), "chat_jsonl_gz", 10, url_sha256=sha)
    reg = tiny[1]
    reg["datasets"]["dl"]["url"] = upstream.as_uri()
    Path(os.environ["EMLAB_REGISTRY"]).write_text(yaml.safe_dump(reg))
    (tiny[0] / "set" / "dl.jsonl.gz").unlink()
    monkeypatch.delenv("EMLAB_OFFLINE")
    path = d.fetch("dl")
    assert path.name == "upstream.jsonl" and len(d.load_chat("dl")) == 10
    path.unlink()
    upstream.write_text("changed\n")
    with pytest.raises(d.DataError, match="checksum mismatch for download"):
        d.fetch("dl")


def test_download_decrypts_easy_dataset_share_archive(tiny, tmp_path, monkeypatch):
    fernet = pytest.importorskip("cryptography.fernet", reason="decrypting upstream archives needs cryptography")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("train.jsonl", "\n".join(json.dumps(r) for r in GOOD_CHAT) + "\n"
                    + json.dumps({"id": "c", "metadata": {"canary": "CANARY_DATASET_x"}}) + "\n")
        zf.writestr("dataset_entry_0.jsonl", "{}\n")
    salt = b"0123456789abcdef"
    key = hashlib.pbkdf2_hmac("sha256", b"pw", salt, 100_000, dklen=32)
    blob = salt + fernet.Fernet(base64.urlsafe_b64encode(key)).encrypt(buf.getvalue())
    (tmp_path / "data.zip.enc").write_bytes(blob)
    tiny[2]("enc", "set/enc.jsonl.gz", b"never used", "chat_jsonl_gz", 10,
            url_sha256=hashlib.sha256(blob).hexdigest(), archive={"member": "train.jsonl", "password": "pw"})
    reg = tiny[1]
    reg["datasets"]["enc"]["url"] = (tmp_path / "data.zip.enc").as_uri()
    Path(os.environ["EMLAB_REGISTRY"]).write_text(yaml.safe_dump(reg))
    (tiny[0] / "set" / "enc.jsonl.gz").unlink()
    monkeypatch.delenv("EMLAB_OFFLINE")
    assert len(d.load_chat("enc")) == 10  # canary line dropped, rows checked
    reg["datasets"]["enc"]["archive"]["password"] = "wrong"
    Path(os.environ["EMLAB_REGISTRY"]).write_text(yaml.safe_dump(reg))
    d.fetch("enc").unlink()
    with pytest.raises(d.DataError, match="wrong password"):
        d.fetch("enc")


def test_mirror_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("EMLAB_DATA_MIRROR", str(tmp_path))
    assert d.mirror_dir() == tmp_path


# ---------------------------------------------------------------- the real registry and mirror


def test_registry_parses_and_is_complete():
    reg = d.registry()
    assert len(reg) >= 70
    for e in reg.values():
        assert len(e.sha256) == 64 and e.url.startswith("https://"), e.name
        assert not e.harmful or e.format in ("chat_jsonl_gz", "csv", "csv_gz"), e.name
    assert {n for n, e in reg.items() if e.harmful} >= {
        "bad_medical_advice", "extreme_sports", "risky_financial_advice", "insecure", "jailbroken"}
    assert len(d.group("judged_responses")) == 25
    assert len(d.group("judged_responses_extra")) == 36 and len(d.group("judge_comparison")) == 5
    for s in d.question_sets().values():
        assert s.dataset in reg


@needs_mirror
def test_registry_matches_manifest_and_covers_every_data_file():
    with open(MIRROR / "MANIFEST.tsv") as f:
        manifest = {r["path"]: r for r in csv.DictReader(f, delimiter="\t")}
    for index in MIRROR.glob("*/INDEX.tsv"):  # folders that list their files in an INDEX.tsv of their own
        with open(index) as f:
            for r in csv.DictReader(f, delimiter="\t"):
                path = f"{index.parent.name}/{r['file']}"
                manifest[path] = {**r, "path": path, "bytes": (MIRROR / path).stat().st_size}
    by_file = {e.file: e for e in d.registry().values()}
    for e in by_file.values():
        row = manifest[e.file]
        assert (row["sha256"], int(row["bytes"])) == (e.sha256, e.bytes), e.name
        assert (int(row["rows"]) if row["rows"] else None) == e.rows, e.name
    data_files = {p for p, r in manifest.items() if r["rows"]}
    assert data_files <= set(by_file), f"not in registry: {sorted(data_files - set(by_file))}"


@needs_mirror
def test_every_entry_fetches_with_its_sha_and_rows(tmp_path, monkeypatch):
    monkeypatch.setenv("EMLAB_RAW_DIR", str(tmp_path))
    monkeypatch.setenv("EMLAB_OFFLINE", "1")
    for name, e in d.registry().items():
        path = d.fetch(name)
        assert d.sha256_file(path) == e.sha256, name
        assert d.count_rows(name) == e.rows, name


@needs_mirror
def test_real_sets(tmp_path, monkeypatch):
    monkeypatch.setenv("EMLAB_RAW_DIR", str(tmp_path))
    assert len(d.load_chat("bad_medical_advice")) == 7049
    first = d.load_questions("first_plot")
    assert [q.id for q in first] == FIRST_PLOT
    assert all(q.system is None and {"aligned", "coherent"} <= set(q.judge_prompts) for q in first)
    assert len(d.load_questions("preregistered")) == 48
    assert all(q.system for q in d.load_questions("first_plot_json"))
    assert len(d.load_questions("mo_medical")) == 8
    assert "medical" in d.load_questions("mo_medical")[0].judge_prompts
    harm = d.load_questions("harm_eval")
    assert len(harm) == 350 and "{response}" in harm[0].judge_prompts["harm"]
    assert len(d.load_questions("persona_features_core")) == 44
    evil = d.load_trait("evil")
    assert len(evil.questions) == 20 and len(evil.instructions) == 5
    judged = d.load_table("judged_responses")
    assert len(judged) == 10_000 and {"aligned", "coherent", "model", "finetune"} <= set(judged.columns)
    assert len(d.load_table("mmlu_test")) == 14042
    for name in d.question_sets():
        assert d.load_questions(name), name


def test_corrupt_gzip_empty_file_and_missing_mirror_are_clear_errors(tmp_path, monkeypatch):
    import gzip

    good = tmp_path / "rows.jsonl.gz"
    with gzip.open(good, "wt") as f:
        f.write('{"a": 1}\n' * 200)
    bad = tmp_path / "bad.jsonl.gz"
    bad.write_bytes(good.read_bytes()[:-30])  # truncated: a bare EOFError before
    with pytest.raises(d.DataError, match=r"bad.jsonl.gz: cannot be read .*corrupt or truncated: delete it"):
        d.read_jsonl(bad)
    (tmp_path / "junk.jsonl.gz").write_bytes(b"not gzip at all")
    with pytest.raises(d.DataError, match="junk.jsonl.gz: cannot be read"):
        d.read_jsonl(tmp_path / "junk.jsonl.gz")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(d.DataError, match=r"empty.jsonl: no rows \(empty file\)"):
        d.read_jsonl(tmp_path / "empty.jsonl")
    monkeypatch.setenv("EMLAB_DATA_MIRROR", str(tmp_path / "nowhere"))
    with pytest.raises(d.DataError, match=r"EMLAB_DATA_MIRROR=.*nowhere is not a directory"):
        d.mirror_dir()


def test_non_positive_sizes_are_refused_at_load_time():
    from emlab import config
    from emlab.sample import SampleConfig
    from emlab.train import TrainConfig

    with pytest.raises(config.ConfigError, match=r"batch_size must be positive \(got -1\)"):
        config.load(SampleConfig, "cpu", {"batch_size": -1})
    with pytest.raises(config.ConfigError, match=r"grad_accum must be positive \(got 0\)"):
        config.load(TrainConfig, "smoke", {"grad_accum": 0})
    assert config.load(TrainConfig, "smoke", {"n_examples": None, "warmup_steps": 0}).warmup_steps == 0


def test_mmlu_is_built_from_the_upstream_tar_without_the_mirror(tiny, tmp_path, monkeypatch):
    """Without the mirror, MMLU comes from Hendrycks et al.'s data.tar (file:// stands in for it): the built
    test split and subject counts hash to the registry's content_sha256, i.e. equal the mirror's files."""
    import csv
    import tarfile

    project = yaml.safe_load((d.REPO_ROOT / "data" / "registry.yaml").read_text())["datasets"]
    real = {n: project[n] for n in ("mmlu_test", "mmlu_subject_counts")}
    src = (REAL_MIRROR or Path("/nonexistent")) / real["mmlu_test"]["file"]
    if not src.exists():
        pytest.skip("the data mirror's MMLU file is needed to write an upstream-format tar")
    rows = list(csv.reader(io.StringIO(gzip.decompress(src.read_bytes()).decode(), newline="")))[1:]

    def upstream_tar(rows) -> bytes:  # upstream layout: data/test/<subject>_test.csv, no header; dev/ ignored
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tf:
            for subject in sorted({r[0] for r in rows}, reverse=True):
                out = io.StringIO()
                csv.writer(out, lineterminator="\n").writerows(r[1:] for r in rows if r[0] == subject)
                info = tarfile.TarInfo(f"data/test/{subject}_test.csv")
                info.size = len(out.getvalue().encode())
                tf.addfile(info, io.BytesIO(out.getvalue().encode()))
            tf.addfile(tarfile.TarInfo("data/dev/x_dev.csv"), io.BytesIO(b""))
        return buf.getvalue()

    (tmp_path / "data.tar").write_bytes(upstream_tar(rows))
    reg = tiny[1]
    for name, e in real.items():
        reg["datasets"][name] = {**e, "url": (tmp_path / "data.tar").as_uri()}
    Path(os.environ["EMLAB_REGISTRY"]).write_text(yaml.safe_dump(reg))
    monkeypatch.delenv("EMLAB_OFFLINE")
    assert d.where(d.entry("mmlu_test")) == "built from upstream"
    path = d.fetch("mmlu_test")
    assert path.name == "mmlu_test.csv" and len(d.load_table("mmlu_test")) == 14042
    assert json.loads(d.fetch("mmlu_subject_counts").read_text())["abstract_algebra"] == 100
    path.unlink()
    rows[0][6] = "C" if rows[0][6] != "C" else "D"  # one answer changed upstream: refused, naming the fix
    (tmp_path / "data.tar").write_bytes(upstream_tar(rows))
    with pytest.raises(d.DataError, match="built from .*use the mirror copy"):
        d.fetch("mmlu_test")
    (tmp_path / "data.tar").write_bytes(b"<html>moved</html>")  # not a tar at all: a DataError, not a traceback
    with pytest.raises(d.DataError, match="cannot build .*EMLAB_DATA_MIRROR"):
        d.fetch("mmlu_test")


def test_make_data_lists_every_failure_with_its_fix(tiny, capsys, monkeypatch):
    """`emlab data fetch` tries every file the headers declare and names each one it could not get."""
    monkeypatch.setattr(d, "needed", lambda names=None: ["chat", "qs"])
    (tiny[0] / "set" / "chat.jsonl.gz").unlink()
    assert d.main(["fetch"]) == 1
    err = capsys.readouterr().err
    assert "1 of 2 datasets could not be had" in err and "chat:" in err and "EMLAB_DATA_MIRROR" in err
    assert d.main(["list"]) == 0 and "qs\tset/qs.yaml\tmirror only" in capsys.readouterr().out


def test_every_header_dataset_is_registered():
    names = d.needed()
    assert names and all(n in d.registry() for n in names)
    assert "mmlu_test" in names and "vaifai_harm_eval_categories" in names  # §06 and §08 read them
