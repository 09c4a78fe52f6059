"""The embedding store: each text is embedded once per name and setting, whatever subsample it comes in."""
import numpy as np
import pandas as pd

from emlab import embeddings as E
from emlab import judge_heldout as H


def _fake_embed(calls):
    def embed(texts, window=E.WINDOW, chunked=True, progress=None):
        calls.append(list(texts))
        return np.array([[len(t), window, float(chunked)] + [0.0] * 381 for t in texts], dtype=np.float32)
    return embed


def test_store_embeds_only_new_texts_and_returns_them_in_order(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(E, "cache_dir", lambda: tmp_path)
    monkeypatch.setattr(E, "embed", _fake_embed(calls))
    a = E.embed_cached(["aa", "b"], key="f")
    assert calls == [["aa", "b"]] and a[:, 0].tolist() == [2, 1]
    b = E.embed_cached(["ccc", "b", "aa", "ccc"], key="f")
    assert calls[-1] == ["ccc"] and b[:, 0].tolist() == [3, 1, 2, 3]
    assert E.embed_cached(["b", "ccc"], key="f")[:, 0].tolist() == [1, 3] and len(calls) == 2
    E.embed_cached(["b"], key="f", window=128)  # another setting: its own store
    assert calls[-1] == ["b"] and len(list(tmp_path.glob("f-*.npz"))) == 2
    E.embed_cached(["b"], key="g")  # another name: its own store
    assert calls[-1] == ["b"] and len(calls) == 4


def test_subsamples_are_nested_so_the_smaller_reuses_the_larger():
    df = pd.DataFrame({"x": range(1000)})
    small, large = set(H._rows(df, 100, 0)), set(H._rows(df, 200, 0))
    assert len(small) == 100 and small < large
    assert set(H._rows(df, 100, 1)) != small


def test_the_data_key_names_the_subsample_scheme_only_when_it_subsamples():
    """A judge built on the old (non-nested) rows is another judge; the full data is the same either way."""
    import hashlib

    from emlab import data

    names = H.default_names()[:2]
    shas = "\n".join(f"{n}:{data.entry(n).sha256}" for n in names).encode()
    old = lambda rows: hashlib.sha256(f"{rows}|0|".encode() + shas).hexdigest()  # noqa: E731 (the key before)
    assert H.data_sha(100, 0, names) != old(100)
    assert H.data_sha(None, 0, names) == old(None)


def test_an_unreadable_store_is_re_embedded_not_fatal(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(E, "cache_dir", lambda: tmp_path)
    monkeypatch.setattr(E, "embed", _fake_embed(calls))
    E.embed_cached(["a"], key="f")
    next(tmp_path.glob("f-*.npz")).write_bytes(b"not a zip")
    assert E.embed_cached(["a", "bb"], key="f")[:, 0].tolist() == [1, 2] and calls[-1] == ["a", "bb"]
