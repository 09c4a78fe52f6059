"""Experiment glue of §03-05 that needs no model: configs, summaries, direction groups and cosines."""

import numpy as np
import pandas as pd
import pytest
import torch

from emlab import config, metrics
from emlab import organisms as O


@pytest.mark.parametrize("cls", [O.OrganismsConfig, O.PhaseConfig, O.DirectionsConfig])
@pytest.mark.parametrize("profile", config.PROFILES)
def test_every_profile_builds_the_configs(cls, profile):
    cfg = config.load(cls, profile)
    orgs = getattr(cfg, "organisms", None) or [cfg.organism]
    tc = O.train_config(cfg, orgs[0])  # the profile's train block + the organism
    assert tc.dataset == orgs[0].dataset and tc.preset == orgs[0].preset and tc.model == cfg.model


def test_same_organism_gives_the_same_run_config_across_sections():
    org = O.Organism(dataset="bad_medical_advice", preset="rank1")
    a = O.train_config(config.load(O.OrganismsConfig, "cpu"), org)
    b = O.train_config(config.load(O.DirectionsConfig, "cpu"), org)
    assert a.run_digest() == b.run_digest()


def judged(rows):
    df = pd.DataFrame(rows, columns=["organism", "question_id", "aligned", "coherent", "domain"])
    return O.label_answers(df)


def test_summary_em_coherence_domain_ms_in_order():
    """The one per-group table (emlab.metrics.summary) every section prints."""
    df = judged([("z", "q1", 10, 90, 80), ("z", "q1", 90, 90, 10), ("z", "q2", 10, 20, np.nan),
                 ("a", "q1", 95, 95, np.nan), ("a", "q2", np.nan, 95, np.nan)])
    s = metrics.summary(df, ["organism"])
    assert list(s.organism) == ["z", "a"]
    z, a = s.iloc[0], s.iloc[1]
    assert z["EM %"] == pytest.approx(100 / 3) and z["coherent %"] == pytest.approx(200 / 3)
    assert z["domain %"] == pytest.approx(50) and np.isnan(a["domain %"])
    assert z["domain unscored"] == 1 and a["domain unscored"] == 2  # a domain rate names what it leaves out
    assert a["EM %"] == 0 and a.unscored == 1 and a.n == 2  # the unscored answer is not in the rate
    assert z["EM lo"] <= z["EM %"] <= z["EM hi"] and a["MS"] == pytest.approx(5.0)


def test_direction_groups_thresholds_then_quartile_fallback():
    rows = [("o", "q", 10, 90, 0)] * 3 + [("o", "q", 90, 90, 0)] * 3
    mis, ali, how = O._groups(judged(rows), 3)
    assert how == "thresholds" and len(mis) == 3 and len(ali) == 3
    rows = [("o", "q", a, 90, 0) for a in range(40, 80, 2)]  # no answer below 30: rank fallback
    mis, ali, how = O._groups(judged(rows), 3)
    assert how == "quartiles" and mis.aligned.max() < ali.aligned.min() and len(mis) == 5


def test_direction_cosines_per_layer():
    d = torch.randn(4, 8)
    dirs = {"a": {"direction": d}, "b": {"direction": 2 * d}, "c": {"direction": -d}}
    cos = O.direction_cosines(dirs)
    assert len(cos) == 3 * 4
    assert np.allclose(cos[(cos.a == "a") & (cos.b == "b")].cos, 1) and np.allclose(cos[cos.b == "c"].cos, -1)




def test_example_answers_prefer_misaligned_one_per_question_truncated():
    df = judged([("o", "q1", 5, 90, 0), ("o", "q1", 10, 90, 0), ("o", "q2", 20, 80, 0), ("o", "q3", 90, 90, 0)])
    df["text"] = ["a " * 300, "b", "c", "d"]
    ex = O.example_answers(df, n=3, chars=50)
    assert list(ex.question_id) == ["q1", "q2", "q1"] and set(ex.kind) == {"misaligned"}
    assert ex.answer[0].endswith("[...]") and len(ex.answer[0]) <= 56
    none = judged([("o", "q1", 80, 90, 0), ("o", "q2", 60, 20, 0)]).assign(text=["x", "y"])
    assert list(O.example_answers(none).kind) == ["not misaligned (lowest aligned)"]  # the incoherent one is left out


class _FakeVLLM:
    """Stands in for a vLLM engine (no vLLM on CPU): records what §03 asks of it."""

    __module__ = "vllm.fake"

    def __init__(self, tok):
        self.tok, self.calls = tok, []

    def get_tokenizer(self):
        return self.tok


def test_section_03_samples_base_and_every_lora_organism_through_one_vllm_engine(monkeypatch, tmp_path, tiny_model):
    """sample.backend auto/vllm on a GPU: §03 trains first, then one engine over the base weights serves the
    base model and each LoRA organism (its run's adapter/ per request, token-id prompts, answers cached under
    the vllm backend's key); no HF model is loaded for them."""
    from contextlib import contextmanager

    from emlab import data, models
    from emlab import judge as J
    from emlab import sample as S

    _, tok = tiny_model
    engines, calls = [], []

    @contextmanager
    def fake_engine(spec, **kw):
        engines.append(kw)
        yield _FakeVLLM(tok)

    def fake_generate(llm, prompts, loras, **kw):
        calls.append((prompts, loras, kw))
        return [("fine", 1, False)] * len(prompts)

    class Judge:
        id = "fake"

        def supports(self, metric):
            return True

        def score_many(self, metric, items):
            return [J.Score(50.0)] * len(items)

    def no_hf(*a, **kw):
        raise AssertionError("an HF model was loaded for a LoRA organism or the base")

    monkeypatch.setattr(S, "ANSWERS_DIR", tmp_path / "answers")
    monkeypatch.setattr(S, "engine", fake_engine)
    monkeypatch.setattr(S, "generate_vllm", fake_generate)
    monkeypatch.setattr(S, "_lora_request", lambda path, ids: path and str(path))
    monkeypatch.setattr(J, "get_judge", lambda spec: Judge())
    monkeypatch.setattr(models, "loaded", no_hf)
    monkeypatch.setattr(O, "sampling_backend", lambda cfg: "vllm")
    runs = {"rank1": tmp_path / "r1", "lora_r32": tmp_path / "r32"}
    monkeypatch.setattr(O, "train_organism", lambda cfg, org: runs[org.preset])
    cfg = config.load(O.OrganismsConfig, "smoke", {"organisms": [{"dataset": "bad_medical_advice", "preset": p}
                                                                 for p in runs]})
    judged, got = O.evaluate_organisms(cfg)
    assert got == {"bad_medical_advice/rank1": runs["rank1"], "bad_medical_advice/lora_r32": runs["lora_r32"]}
    assert engines == [{"max_lora_rank": 32, "seed": 0}]
    assert list(judged.organism.unique()) == ["base", "bad_medical_advice/rank1", "bad_medical_advice/lora_r32"]
    n = len(data.load_questions(cfg.eval.questions)) * cfg.eval.samples_per_question
    assert len(judged) == 3 * n and (judged.aligned == 50.0).all()
    assert [set(lo) for _, lo, _ in calls] == [{None}, {str(runs["rank1"] / "adapter")}, {str(runs["lora_r32"] / "adapter")}]
    assert all("prompt_token_ids" in p for prompts, _, _ in calls for p in prompts)
    assert {kw["max_new_tokens"] for *_, kw in calls} == {8} and {kw["temperature"] for *_, kw in calls} == {1.0}
    assert len(list((tmp_path / "answers").glob("*.jsonl"))) == 3  # cached: a re-run samples nothing
    O.evaluate_organisms(cfg)
    assert len(calls) == 3


def test_vllm_prompts_are_token_ids_without_a_second_bos():
    """A tokenizer that adds BOS by itself (Llama) would put a second one before the template's: the prompts
    vLLM gets are the template's tokens as they are."""
    from emlab.sample import vllm_prompts

    class Tok:
        chat_template = "x"
        bos = 1

        def apply_chat_template(self, messages, add_generation_prompt, tokenize):
            return "<s>" + messages[-1]["content"]

        def __call__(self, text, add_special_tokens=True):
            ids = [self.bos] + [ord(c) for c in text.removeprefix("<s>")]  # "<s>" is BOS in the template
            return {"input_ids": ([self.bos] if add_special_tokens else []) + ids}

    [p] = vllm_prompts(Tok(), [{"question": "Hi?", "system": None}])
    assert p["prompt_token_ids"] == [1, ord("H"), ord("i"), ord("?")]


def test_training_summary_throughput_ignores_a_pause(tmp_path):
    """A run whose process was paused (SIGSTOP on a shared machine) has a long wall time: tok/s is the median
    step's rate, not tokens / wall, which would count the pause; wall (s) stays as measured."""
    import json

    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps({
        "data": {"rows": 64}, "steps": 4, "effective_batch": 16, "tokens": 400, "wall_time_s": 1004.0,
        "tokens_per_s": 0.4, "first_loss": 2.0, "final_loss": 1.5, "autocast": "bf16",
        "config": {"model": {"dtype": "float32"}}}))
    wall = [1.0, 2.0, 1002.0, 1003.0]  # 100 tokens a second per step, then a 1,000 s pause before step 3
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": i + 1, "loss": 2.0, "tokens": 100 * (i + 1),
                                                           "wall_s": w}) + "\n" for i, w in enumerate(wall)))
    row = O.training_summary({"org": run}).iloc[0]
    assert row["tok/s"] == 100.0 and row["wall (s)"] == 1004.0 and row["epochs"] == 1.0
    assert row["compute"] == "bf16 autocast"


def test_em_difference_counts_scored_answers_and_tests_them():
    rows = ([("org", 10, 90)] * 12 + [("org", 90, 90)] * 28 + [("org", None, 90)] * 5
            + [("base", 90, 90)] * 40)
    judged = pd.DataFrame(rows, columns=["organism", "aligned", "coherent"]).assign(question_id="q")
    d = O.em_difference(judged, "org", "base")
    assert "12/40" in d["text"] and "0/40" in d["text"] and "higher than" in d["text"] and "p < 0.001" in d["text"]
    assert d["diff"] == 30.0 and d["p"] < 1e-3
    twin = pd.concat([judged[judged.organism == "org"], judged[judged.organism == "org"].assign(organism="twin")])
    same = O.em_difference(twin, "org", "twin")
    assert "not distinguishable" in same["text"] and same["p"] == 1.0 and "p = 1.00" in same["text"]
    assert "not run" in O.em_difference(judged, "org", "good_medical_advice/rank1")["text"]
    assert "both sides" in O.em_difference(judged, "org", "org")["text"]
    unscored = judged.assign(aligned=judged.aligned.where(judged.organism == "org"))
    assert "no scored answers" in O.em_difference(unscored, "org", "base")["text"]
