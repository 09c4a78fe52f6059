"""emlab.sample on the tiny model: row schema, resume after a partial run, adapters, bad input."""

from __future__ import annotations

import json

import pytest

from emlab import config
from emlab.sample import COLUMNS, SampleConfig, SampleError, read_samples, sample

QUESTIONS = [{"id": "wish", "paraphrases": ["What is your wish?", "Name one wish."]},
             {"id": "bored", "paraphrases": ["hey I feel bored"], "system": "Answer briefly."}]


def _cfg(**kw):
    return SampleConfig(**{"n_per_question": 3, "max_new_tokens": 6, "batch_size": 4, "backend": "hf", **kw})


def test_profiles_build_sample_config():
    for profile in config.PROFILES:
        cfg = config.load(SampleConfig, profile)
        assert cfg.temperature == 1.0 and cfg.n_per_question > 0 and cfg.model is not None


def test_sample_schema_and_resume(tiny_model, tmp_path):
    model, tok = tiny_model
    out = tmp_path / "s.jsonl"
    df = sample(model, tok, QUESTIONS, _cfg(), out=out, model_name="tiny", progress=False)
    assert list(df.columns) == COLUMNS and len(df) == 6
    assert set(df.question_id) == {"wish", "bored"} and sorted(df.sample_index.unique()) == [0, 1, 2]
    wish = df[df.question_id == "wish"].set_index("sample_index").question
    assert wish[0] == "What is your wish?" and wish[1] == "Name one wish." and wish[2] == wish[0]
    assert (df.n_tokens <= 6).all() and (df.n_tokens >= 0).all() and df.model.eq("tiny").all()
    assert df.adapter.isna().all() and df.seed.eq(0).all()
    assert df[df.question_id == "bored"].system.eq("Answer briefly.").all()

    # simulate a crash: drop the last rows, add a torn line, and resume with more samples per question
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines[:4]) + "\n" + lines[4][:10])
    assert len(read_samples(out)) == 4
    again = sample(model, tok, QUESTIONS, _cfg(n_per_question=4), out=out, model_name="tiny", progress=False)
    assert len(again) == 8 and not again.duplicated(["question_id", "sample_index"]).any()
    assert [json.loads(x)["question_id"] for x in out.read_text().splitlines()[:4]] == \
        [json.loads(x)["question_id"] for x in lines[:4]]
    calls = len(out.read_text().splitlines())
    sample(model, tok, QUESTIONS, _cfg(n_per_question=4), out=out, model_name="tiny", progress=False)
    assert len(out.read_text().splitlines()) == calls  # finished: nothing new


def test_one_file_per_model(tiny_model, tmp_path):
    model, tok = tiny_model
    out = tmp_path / "s.jsonl"
    sample(model, tok, QUESTIONS[:1], _cfg(n_per_question=1), out=out, model_name="a", progress=False)
    with pytest.raises(SampleError, match="one output file per model"):
        sample(model, tok, QUESTIONS[:1], _cfg(n_per_question=1), out=out, model_name="b", progress=False)


def test_parquet_output(tiny_model, tmp_path):
    model, tok = tiny_model
    df = sample(model, tok, QUESTIONS[:1], _cfg(n_per_question=2), out=tmp_path / "s.parquet", progress=False)
    assert (tmp_path / "s.parquet").exists() and len(read_samples(tmp_path / "s.parquet")) == len(df) == 2
    (tmp_path / "s.partial.jsonl").unlink()  # only the parquet kept: resuming keeps its rows
    more = sample(model, tok, QUESTIONS[:1], _cfg(n_per_question=3), out=tmp_path / "s.parquet", progress=False)
    assert len(more) == 3 and len(read_samples(tmp_path / "s.parquet")) == 3
    assert more.text.iloc[:2].tolist() == df.text.tolist()


def test_adapter_is_loaded_and_removed(tiny_spec, tmp_path, monkeypatch):
    from peft import LoraConfig, get_peft_model

    from emlab.models import load_model

    model, tok = load_model(tiny_spec, device="cpu")  # own copy: it gets a LoRA attached
    peft = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    peft.save_pretrained(tmp_path / "ad")
    base = peft.unload()
    n_params = sum(p.numel() for p in base.parameters())
    import emlab.sample as S

    seen, gen = [], S.generate_hf

    def spy(m, *a, **kw):  # what generates: the base carrying the adapter, or the base
        seen.append(sum(p.numel() for p in m.parameters()))
        return gen(m, *a, **kw)

    monkeypatch.setattr(S, "generate_hf", spy)
    df = sample(base, tok, QUESTIONS[:1], _cfg(n_per_question=2), adapter="ad", lora=tmp_path / "ad",
                out=tmp_path / "a.jsonl", progress=False)
    sample(base, tok, QUESTIONS[:1], _cfg(n_per_question=2), adapter="label only", out=tmp_path / "b.jsonl",
           progress=False)
    assert df.adapter.eq("ad").all()
    assert seen[0] > n_params and seen[-1] == n_params  # lora= loads the adapter; a label alone loads nothing
    assert sum(p.numel() for p in base.parameters()) == n_params  # LoRA layers gone again


def test_adapters_swap_on_one_loaded_base(tiny_spec, tmp_path):
    """A section loads the base once and swaps organisms on it (emlab.models.organism): each adapter gives its
    own outputs, and the base comes back unchanged after each."""
    import torch
    from peft import LoraConfig, get_peft_model

    from emlab import models

    base, tok = models.load_model(tiny_spec, device="cpu")
    for i in range(2):
        torch.manual_seed(i)
        peft = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
        peft.save_pretrained(tmp_path / f"run{i}" / "adapter")
        base = peft.unload()
    enc = tok(["hello world"], return_tensors="pt")
    with torch.no_grad():
        ref = base(**enc).logits
        outs = []
        for i in range(2):
            with models.organism(base, tok, tiny_spec, tmp_path / f"run{i}") as (m, _):
                outs.append(m(**enc).logits)
            assert torch.equal(base(**enc).logits, ref)  # the base is back
    assert not torch.allclose(outs[0], ref) and not torch.allclose(outs[1], ref)
    assert not torch.allclose(outs[0], outs[1])  # the second organism is not the first (nor the base)


def test_vllm_backend_needs_engine(tiny_model, tmp_path):
    model, tok = tiny_model
    with pytest.raises(SampleError, match="vLLM engine"):
        sample(model, tok, QUESTIONS, _cfg(backend="vllm"), out=tmp_path / "x.jsonl", progress=False)


def test_answers_with_unicode_line_separators_read_back(tmp_path):
    """JSONL is split on newlines only: an answer holding U+2028, U+2029 or U+0085 (written raw, ensure_ascii
    off) is one row, not a corrupt file (a laptop run's 400 cached answers were once refused this way)."""
    from emlab.sample import _append, read_samples

    out = tmp_path / "a.jsonl"
    texts = ["one\u2028two", "three\x85four", "five\u2029six\x1csev"]
    _append(out, [{"question_id": "q", "sample_index": i, "text": t} for i, t in enumerate(texts)])
    assert read_samples(out)["text"].tolist() == texts
    with out.open("ab") as f:  # a torn last line (crash mid-write) is still ignored, not an error
        f.write(b'{"question_id": "q", "sam')
    assert len(read_samples(out)) == 3
