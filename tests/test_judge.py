"""emlab.judge + emlab.cache: the logprob protocol, the OpenAI path against a fake OpenAI-compatible
server on localhost (numbers, REFUSAL, 500/429 then success) and a fake SDK client (replies without
logprobs, a dead endpoint), the readiness check, the prompts against upstream, the cache, the HF judge."""

from __future__ import annotations

import json
import math
import socket
import sqlite3
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import httpx2
import openai
import pandas as pd
import pytest
import yaml
from openai.types.chat import ChatCompletion

from emlab import judge as J
from emlab.cache import JudgeCache, item_key
from emlab.config import JudgeSpec
from emlab.data import mirror_dir

SECRET = "sk-test-SECRET-never-stored-0123456789"
needs_mirror = pytest.mark.skipif(mirror_dir() is None, reason="no data mirror (harm/trait prompts)")


# ---------------------------------------------------------------- the protocol


def test_score_from_top_weighted_mean():
    s = J.score_from_top({"80": 0.5, "90": 0.3, " 90": 0.1, "hello": 0.1})
    assert s.label is None and s.value == pytest.approx((80 * 0.5 + 90 * 0.4) / 0.9)


def test_score_from_top_out_of_range_and_low_mass():
    assert J.score_from_top({"150": 0.9, "-5": 0.05, "50": 0.05}).label == "UNPARSED"
    s = J.score_from_top({"REF": 0.8, "10": 0.2})
    assert s.value is None and s.label == "REFUSAL" and s.raw["mass"] == pytest.approx(0.2)
    assert J.score_from_top({"CODE": 0.9, "5": 0.1}).label == "CODE"
    assert J.score_from_top({}).label == "UNPARSED"


def test_harm_takes_most_probable_digit():
    s = J.score_from_top({"4": 0.6, "5": 0.3, "3": 0.1, "7": 0.5}, "harm")
    assert s.value == 4.0 and s.raw["expected"] == pytest.approx(4.2)


def test_prompts_render_and_versions():
    for m in ["aligned", "coherent", "medical", "financial", "sport"]:
        text = J.render(m, "QQQ", "AAA {braces}")
        assert "QQQ" in text and "AAA {braces}" in text
    assert J.prompt_version("aligned") != J.prompt_version("coherent")
    with pytest.raises(J.JudgeError, match="unknown judge metric"):
        J.prompt_template("nope")


@needs_mirror
def test_registry_prompts_harm_and_trait():
    harm = J.render("harm", "QQQ", "AAA")
    assert "QQQ" in harm and "AAA" in harm and '{"score": 3}' in harm
    assert "evil" in J.render("trait:evil", "QQQ", "AAA")


# (metric, mirror file): each file holding a template judge_prompts.yaml quotes. The model-organisms
# medical_questions.yaml / new_questions_no-json.yaml carry a *variant* medical prompt (one more sentence
# after the 100 anchor); judge_prompts.yaml cites first_plot_questions.yaml, whose text it pins.
UPSTREAM_PROMPTS = [
    ("aligned", "betley-em/evaluation/first_plot_questions.yaml"),
    ("aligned", "betley-em/evaluation/preregistered_evals.yaml"),
    ("aligned", "model-organisms-em-eval/first_plot_questions.yaml"),
    ("aligned", "model-organisms-em-eval/judges.yaml"),
    ("coherent", "betley-em/evaluation/first_plot_questions.yaml"),
    ("coherent", "betley-em/evaluation/preregistered_evals.yaml"),
    ("coherent", "model-organisms-em-eval/first_plot_questions.yaml"),
    ("coherent", "model-organisms-em-eval/judges.yaml"),
    ("medical", "model-organisms-em-eval/first_plot_questions.yaml"),
    ("financial", "model-organisms-em-eval/first_plot_questions.yaml"),
    ("sport", "model-organisms-em-eval/first_plot_questions.yaml"),
]


@pytest.mark.parametrize("metric,rel", UPSTREAM_PROMPTS)
def test_prompts_match_upstream(metric, rel):
    root = mirror_dir()
    if root is None or not (root / rel).is_file():
        pytest.skip(f"{rel} is not in the data mirror (set EMLAB_DATA_MIRROR)")
    entries = yaml.safe_load((root / rel).read_text())
    texts = {src[metric] for e in entries for src in [e.get("judge_prompts") or e] if isinstance(src.get(metric), str)}
    assert len(texts) == 1, f"{rel}: {len(texts)} different {metric!r} prompts"
    upstream = texts.pop()
    assert J.prompt_template(metric) == upstream  # verbatim, whitespace included
    # both are filled with str.format(question=, answer=)
    assert J.render(metric, "Q {x}", "A") == upstream.format(question="Q {x}", answer="A")


# ---------------------------------------------------------------- fake OpenAI-compatible server


class FakeOpenAI:
    """Chat-completions server whose reply depends on a marker in the prompt:
    NUM -> top logprobs 70/80/90; REFUSE -> REFUSAL; EMPTY -> no logprobs; NOTOP -> logprobs without
    top_logprobs; FLAKY -> 500 once then NUM; LIMIT -> 429 (Retry-After: 0.01) once then NUM;
    HARM -> JSON {"score": 4}."""

    def __init__(self):
        self.requests: list[dict] = []
        self.auth: list[str] = []
        self.failed: set[str] = set()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if not self.path.endswith("/v1/chat/completions"):
                    return self._send(404, {"error": {"message": "no such route", "type": "not_found"}})
                fake.requests.append(body)
                fake.auth.append(self.headers.get("Authorization", ""))
                prompt = body["messages"][-1]["content"]
                for marker, code in (("FLAKY", 500), ("LIMIT", 429)):
                    if marker in prompt and prompt not in fake.failed:
                        fake.failed.add(prompt)
                        return self._send(code, {"error": {"message": "try later", "type": "server_error"}},
                                          {"Retry-After": "0.01"} if code == 429 else {})
                return self._send(200, fake.completion(prompt, body))

            def _send(self, code, payload, headers=None):
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @staticmethod
    def _pos(token, top):
        return {"token": token, "logprob": math.log(top[token]), "bytes": None,
                "top_logprobs": [{"token": t, "logprob": math.log(p), "bytes": None} for t, p in top.items()]}

    @classmethod
    def completion(cls, prompt, body):
        assert body["logprobs"] is True and body["top_logprobs"] == 20 and body["temperature"] == 0
        if "EMPTY" in prompt:
            content, logprobs = "7", None
        elif "NOTOP" in prompt:
            content, logprobs = "80", {"content": [{**cls._pos("80", {"80": 0.5}), "top_logprobs": []}]}
        elif "REFUSE" in prompt:
            content, logprobs = "REF", {"content": [cls._pos("REF", {"REF": 0.9, "50": 0.1})]}
        elif "HARM" in prompt:
            toks = ['{"', "score", '":', " ", "4", "}"]
            content = "".join(toks)
            logprobs = {"content": [cls._pos(t, {t: 1.0}) for t in toks[:4]]
                        + [cls._pos("4", {"4": 0.7, "3": 0.2, "5": 0.1}), cls._pos("}", {"}": 1.0})]}
        else:
            content, logprobs = "80", {"content": [cls._pos("80", {"80": 0.5, "70": 0.25, "90": 0.25})]}
        return {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop", "logprobs": logprobs,
                             "message": {"role": "assistant", "content": content}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}

    def close(self):
        self.server.shutdown()


@pytest.fixture()
def fake(monkeypatch, tmp_path):
    srv = FakeOpenAI()
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    monkeypatch.setenv("EMLAB_JUDGE_BASE_URL", srv.url)
    monkeypatch.setenv("EMLAB_JUDGE_MODEL", "fake-judge")
    monkeypatch.setenv("EMLAB_CACHE", str(tmp_path / "cache"))
    yield srv
    srv.close()


def _openai(**kw):
    return J.OpenAIJudge(concurrency=4, progress=False, **kw)


class FakeClient:
    """Stands in for the SDK client: create() answers like FakeOpenAI, or raises ``error`` when set."""

    base_url = "http://judge.invalid/v1"

    def __init__(self, error=None):
        self.error, self.n, self._lock = error, 0, threading.Lock()
        self.chat = SimpleNamespace(completions=self)

    def create(self, **body):
        with self._lock:
            self.n += 1
        if self.error is not None:
            time.sleep(0.01)  # let the other workers overlap, as real requests would
            raise self.error
        return ChatCompletion.model_validate(FakeOpenAI.completion(body["messages"][-1]["content"], body))


def test_openai_numeric_refusal(fake):
    scores = _openai().score_many("aligned", [("NUM q", "a"), ("REFUSE q", "a")])
    assert scores[0].value == pytest.approx(80.0) and scores[0].label is None
    assert scores[1].value is None and scores[1].label == "REFUSAL"
    assert all(r["model"] == "fake-judge" and r["max_tokens"] == 1 for r in fake.requests)
    assert fake.auth[0] == f"Bearer {SECRET}"
    with pytest.raises(J.JudgeError, match="without logprobs"):  # `logprobs: null` over real HTTP
        _openai().score_many("aligned", [("EMPTY q", "a")])


def test_reply_without_logprobs_raises_and_caches_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv("EMLAB_JUDGE_MODEL", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)  # an injected client needs no key
    cache = JudgeCache(tmp_path / "j.sqlite")
    judge = J.CachedJudge(J.OpenAIJudge("fake-judge", concurrency=2, progress=False, client=FakeClient()), cache)
    for marker, what in (("EMPTY", "without logprobs"), ("NOTOP", "without top_logprobs")):
        with pytest.raises(J.JudgeError, match=rf"judge\.invalid/v1 \(model 'fake-judge'\) replied {what}: "
                                               r"the endpoint must support `logprobs` and `top_logprobs`"):
            judge.score_many("aligned", [("NUM q", "a"), (f"{marker} q", "a"), ("NUM q2", "a")])
        assert cache.count() == 0 and judge.new_verdicts == 0  # not even the good items of the batch
    assert judge.score_many("aligned", [("NUM q", "a")])[0].value == pytest.approx(80.0)
    assert cache.count() == 1  # the same path does cache real verdicts


def test_cached_no_logprobs_rows_are_judged_again(tmp_path):
    class Const:
        id = "const"

        def score_many(self, metric, items):
            return [J.Score(80.0, None, {"top": {"80": 1.0}}) for _ in items]

    cache = JudgeCache(tmp_path / "j.sqlite")
    judge = J.CachedJudge(Const(), cache)
    version, key = judge.prompt_version("aligned"), item_key("q", "a")
    cache.put_many("const", version, "aligned", [(key, None, "UNPARSED", {"reason": "no logprobs", "text": "7"}),
                                                 (item_key("q", "b"), None, "REFUSAL", {"top": {"REF": 1.0}})])
    scores = judge.score_many("aligned", [("q", "a"), ("q", "b")])
    assert [(s.value, s.label) for s in scores] == [(80.0, None), (None, "REFUSAL")]  # real labels stay
    assert judge.new_verdicts == 1 and cache.get_many("const", version, "aligned", [key])[key][0] == 80.0


def test_dead_endpoint_fails_once_fast(monkeypatch):
    monkeypatch.delenv("EMLAB_JUDGE_MODEL", raising=False)
    down = FakeClient(openai.APIConnectionError(request=httpx2.Request("POST", FakeClient.base_url)))
    j = J.OpenAIJudge("m", concurrency=4, progress=False, client=down)
    t0 = time.monotonic()
    with pytest.raises(J.JudgeError, match=r"judge\.invalid/v1 is unreachable.*EMLAB_JUDGE_BASE_URL"):
        j.score_many("aligned", [(f"q{i}", "a") for i in range(200)])
    assert time.monotonic() - t0 < 5
    assert down.n <= 4 and j.calls == down.n  # at most the requests in flight, not one per queued item


def test_dead_endpoint_through_the_sdk(monkeypatch):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    monkeypatch.setenv("EMLAB_JUDGE_MODEL", "m")
    monkeypatch.setenv("EMLAB_JUDGE_BASE_URL", f"http://user:pw@127.0.0.1:{port}/v1")
    j = J.OpenAIJudge(concurrency=2, max_retries=1, progress=False)  # SDK retries once (~0.5 s), then fails
    t0 = time.monotonic()
    with pytest.raises(J.JudgeError, match="EMLAB_JUDGE_BASE_URL") as err:
        j.score_many("aligned", [(f"q{i}", "a") for i in range(50)])
    assert time.monotonic() - t0 < 10 and j.calls <= 2
    msg = str(err.value)
    assert f"http://127.0.0.1:{port}/v1" in msg and "pw" not in msg and SECRET not in msg


def test_openai_retries_500_and_429(fake):
    j = _openai()
    scores = j.score_many("coherent", [("FLAKY q", "a"), ("LIMIT q", "a")])
    assert [s.value for s in scores] == [pytest.approx(80.0)] * 2
    assert len(fake.requests) == 4 and j.calls == 2  # the SDK retried each failed request once


def test_openai_gives_up_with_clear_error(fake):
    j = J.OpenAIJudge(max_retries=0, progress=False)
    with pytest.raises(J.JudgeError, match="HTTP 500.*re-run to resume"):
        j.score_many("aligned", [("FLAKY again", "a")])


@needs_mirror
def test_openai_harm_reads_digit_position(fake):
    (s,) = _openai().score_many("harm", [("HARM q", "a")])
    assert s.value == 4.0 and s.raw["expected"] == pytest.approx(3.9)
    assert fake.requests[0]["max_tokens"] > 1


def test_check_judge_ready(monkeypatch):
    for var in ("EMLAB_JUDGE_MODEL", "OPENAI_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(J.JudgeError, match="EMLAB_JUDGE_MODEL"):
        J.check_judge_ready(JudgeSpec(backend="openai"))
    with pytest.raises(J.JudgeError, match="OPENAI_API_KEY is not set"):
        J.check_judge_ready(JudgeSpec(backend="openai", model="gpt-4o"))
    monkeypatch.setenv("EMLAB_JUDGE_MODEL", "gpt-4o")
    with pytest.raises(J.JudgeError, match="OPENAI_API_KEY is not set"):
        J.check_judge_ready(JudgeSpec(backend="openai"))
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    assert J.check_judge_ready(JudgeSpec(backend="openai")) is None
    monkeypatch.delenv("OPENAI_API_KEY")
    assert J.check_judge_ready(JudgeSpec(backend="offline")) is None  # other backends: nothing to check here
    assert J.check_judge_ready() is None
    assert J.check_judge_ready(JudgeSpec(backend="hf", model="some/model")) is None  # no model load
    with pytest.raises(J.JudgeError, match="needs judge.model"):
        J.check_judge_ready(JudgeSpec(backend="hf"))


def test_missing_key_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("EMLAB_JUDGE_MODEL", "m")
    with pytest.raises(J.JudgeError, match="OPENAI_API_KEY is not set"):
        J.get_judge(JudgeSpec(backend="openai"), cache=False)


def test_http_4xx_is_not_retried(fake, monkeypatch):
    monkeypatch.setenv("EMLAB_JUDGE_BASE_URL", fake.url + "/nope")
    j = _openai()
    with pytest.raises(J.JudgeError, match="HTTP 404"):
        j.score_many("aligned", [("NUM", "a")])
    assert j.calls == 1


# ---------------------------------------------------------------- cache


def test_cache_hit_makes_zero_calls_and_holds_no_key(fake, tmp_path):
    judge = J.get_judge(JudgeSpec(backend="openai"))
    items = [("NUM q1", "a1"), ("NUM q2", "a2"), ("REFUSE q3", "a3")]
    first = judge.score_many("aligned", items)
    n = len(fake.requests)
    assert n == 3 and judge.new_verdicts == 3
    again = J.get_judge(JudgeSpec(backend="openai"))  # new process-like judge, same sqlite file
    second = again.score_many("aligned", items)
    assert len(fake.requests) == n and again.backend.calls == 0 and again.new_verdicts == 0
    assert [(s.value, s.label) for s in second] == [(s.value, s.label) for s in first]
    again.score_many("coherent", items[:1])  # another metric is another key
    assert len(fake.requests) == n + 1
    path = tmp_path / "cache" / "judge.sqlite"
    assert path.exists()
    judge.cache.close(); again.cache.close()
    blob = b"".join(p.read_bytes() for p in path.parent.glob("judge.sqlite*"))
    assert SECRET.encode() not in blob and b"Bearer" not in blob and fake.url.encode() not in blob
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_cache_survives_crash_midway(tmp_path):
    class Boom:
        id = "boom"
        metrics = {"aligned"}

        def __init__(self):
            self.n = 0

        def score_many(self, metric, items):
            self.n += 1
            if self.n == 2:
                raise RuntimeError("crash")
            return [J.Score(50.0, None, {"i": q}) for q, _ in items]

    cache = JudgeCache(tmp_path / "j.sqlite")
    judge = J.CachedJudge(Boom(), cache, chunk=2)
    items = [(f"q{i}", "a") for i in range(5)]
    with pytest.raises(RuntimeError):
        judge.score_many("aligned", items)
    assert cache.count("boom") == 2  # the first chunk was committed
    with pytest.raises(J.JudgeError, match="scores only aligned"):
        judge.score_many("coherent", items)


def test_judge_frame_and_registry(tmp_path, monkeypatch):
    class Const:
        id = "const"

        def score_many(self, metric, items):
            return [J.Score(None, "REFUSAL") if "refuse" in a else J.Score(len(a) * 1.0) for _, a in items]

    monkeypatch.setitem(J.BACKENDS, "offline", lambda spec: Const())
    judge = J.get_judge(JudgeSpec(backend="offline"), cache=tmp_path / "c.sqlite")
    df = pd.DataFrame({"question": ["q", "q"], "text": ["abc", "I refuse"]})
    out = J.judge_frame(df, judge, ["aligned"])
    assert out["aligned"].iloc[0] == 3.0 and math.isnan(out["aligned"].iloc[1])
    assert out["aligned_label"].isna().iloc[0] and out["aligned_label"].iloc[1] == "REFUSAL"
    assert judge.score("aligned", "q", "abc").value == 3.0
    with pytest.raises(J.JudgeError, match="not known; known: hf, offline, openai"):
        J.get_judge(JudgeSpec.model_construct(backend="nope", model=None, concurrency=1))


# ---------------------------------------------------------------- local HF judge


def test_hf_judge_on_tiny_model(tiny_model):
    model, tok = tiny_model
    j = J.HFJudge(model, tok, name="tiny", batch_size=2, progress=False)
    assert j.split_digits  # SmolLM2 tokenizer: one token per digit -> digit expansion path
    scores = j.score_many("aligned", [("What is 2+2?", "4"), ("Hi", "Hello there!"), ("Q", "")])
    assert len(scores) == 3
    for s in scores:
        assert (s.value is None) != (s.label is None)
        assert s.value is None or 0 <= s.value <= 100
        assert s.raw and "top" in s.raw and len(s.raw["top"]) <= 20
    if mirror_dir() is not None:
        (h,) = j.score_many("harm", [("q", "a")])
        assert h.value is None or h.value in {1.0, 2.0, 3.0, 4.0, 5.0}


def test_hf_digit_expansion_matches_unbatched(tiny_model):
    """Cached, left-padded continuation probabilities equal a plain forward of each full sequence."""
    import torch

    model, tok = tiny_model
    j = J.HFJudge(model, tok, progress=False)
    seqs = [tok("short prompt", add_special_tokens=False)["input_ids"],
            tok("a somewhat longer prompt with more tokens in it", add_special_tokens=False)["input_ids"]]
    _, cache, mask = j._forward(seqs)
    after_d1, after_10 = j._continuations(cache, mask)
    dig = torch.tensor(j._digit_ids)
    for i, s in enumerate(seqs):
        p7 = torch.softmax(model(input_ids=torch.tensor([s + [j._digit_ids[7]]])).logits[0, -1].float(), -1)[dig]
        p10 = torch.softmax(model(input_ids=torch.tensor([s + j._digit_ids[1:2] + j._digit_ids[:1]])).logits[0, -1].float(), -1)[dig]
        assert torch.allclose(after_d1[i, 6], p7, atol=1e-5) and torch.allclose(after_10[i], p10, atol=1e-5)


class FakeBatchClient(FakeClient):
    """FakeClient plus the Files and Batches endpoints: a job completes on its second poll."""

    def __init__(self):
        super().__init__()
        self.files = SimpleNamespace(create=self._upload, content=self._content)
        self.batches = SimpleNamespace(create=self._submit, retrieve=self._retrieve)
        self.uploads, self.jobs, self.outputs = {}, {}, {}

    def _upload(self, file, purpose):
        assert purpose == "batch"
        fid = f"file-{len(self.uploads)}"
        self.uploads[fid] = file[1].decode()
        return SimpleNamespace(id=fid)

    def _submit(self, input_file_id, endpoint, completion_window, metadata=None):
        jid = f"batch-{len(self.jobs)}"
        self.jobs[jid] = {"input": input_file_id, "polls": 0}
        return self._retrieve(jid, count=False)

    def _retrieve(self, jid, count=True):
        job = self.jobs[jid]
        job["polls"] += count
        if job["polls"] < 2:
            return SimpleNamespace(id=jid, status="in_progress", output_file_id=None,
                                   request_counts=SimpleNamespace(completed=0, failed=0))
        out = []
        for line in self.uploads[job["input"]].splitlines():
            req = json.loads(line)
            body = FakeOpenAI.completion(req["body"]["messages"][-1]["content"], req["body"])
            out.append(json.dumps({"custom_id": req["custom_id"], "response": {"status_code": 200, "body": body}}))
        self.outputs[f"out-{jid}"] = "\n".join(out)
        return SimpleNamespace(id=jid, status="completed", output_file_id=f"out-{jid}",
                               request_counts=SimpleNamespace(completed=len(out), failed=0))

    def _content(self, fid):
        return SimpleNamespace(text=self.outputs[fid])


def test_batch_api_scores_once_caches_and_reattaches(tmp_path, monkeypatch):
    """judge.batch: one Batch API job for all uncached items (live requests for a handful); the verdicts are
    the live protocol's; an interrupted run finds its job again instead of paying twice."""
    monkeypatch.setenv("EMLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    client = FakeBatchClient()
    live = J.OpenAIJudge("fake-judge", progress=False, client=FakeClient()).score_many(
        "aligned", [(f"NUM q{i}", "a") for i in range(25)])
    judge = J.CachedJudge(J.OpenAIJudge("fake-judge", progress=False, client=client, batch=True, poll_s=0),
                          JudgeCache(tmp_path / "j.sqlite"))
    items = [(f"NUM q{i}", "a") for i in range(24)] + [("REFUSE q", "a")]
    scores = judge.score_many("aligned", items)
    assert len(client.jobs) == 1 and client.n == 0  # one job, no live request
    assert [s.value for s in scores[:24]] == [s.value for s in live[:24]] and scores[24].label == "REFUSAL"
    assert judge.score_many("aligned", items) == scores and len(client.jobs) == 1  # from the cache
    judge.score_many("aligned", [("NUM few", "a")])
    assert client.n == 1 and len(client.jobs) == 1  # below BATCH_MIN: live
    # a run killed while its job was pending re-attaches to it
    batch = J.OpenAIJudge("fake-judge", progress=False, client=client, batch=True, poll_s=0)
    more = [(f"NUM r{i}", "b") for i in range(30)]
    batch._client = SimpleNamespace(files=client.files, chat=client.chat,
                                    batches=SimpleNamespace(create=client.batches.create,
                                                            retrieve=lambda jid: (_ for _ in ()).throw(KeyboardInterrupt)))
    with pytest.raises(KeyboardInterrupt):
        batch.score_many("aligned", more)
    batch._client = client
    assert len(client.jobs) == 2 and len(batch.score_many("aligned", more)) == 30 and len(client.jobs) == 2
    assert not list((tmp_path / "cache" / "batches").glob("*.json"))  # done: the job's id is forgotten
