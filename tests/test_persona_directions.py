"""§09 geometry and glue without a model: projections, cosines by layer, shifts, prompts, bad inputs."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from emlab import config
from emlab import persona_directions as P
from emlab.config import ConfigError
from emlab.metrics import bootstrap_diff


@pytest.mark.parametrize("profile", config.PROFILES)
def test_every_profile_builds_the_config(profile):
    cfg = config.load(P.SharedStructureConfig, profile)
    assert cfg.trigger_target.backdoor and cfg.em_target.dataset
    names = [c["name"] for c in P.comparisons(cfg)]
    assert names[:3] == ["trigger", "persona prompt", "EM organism"] and "trigger on base" in names


def test_config_rejects_swapped_persona_and_control():
    with pytest.raises(ConfigError, match="persona"):
        config.load(P.SharedStructureConfig, "smoke", {"persona": "control:evil.system_persona.v1"})
    with pytest.raises(ConfigError, match="control"):
        config.load(P.SharedStructureConfig, "smoke", {"control": "plain"})
    with pytest.raises(ConfigError, match="backdoor"):
        config.load(P.SharedStructureConfig, "smoke", {"trigger_target": {"name": "t", "dataset": "x"}})


def test_cosine_by_layer_values_and_zero_vectors():
    u = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    v = torch.tensor([[2.0, 0.0], [-1.0, -1.0], [1.0, 0.0]])
    cos = P.cosine_by_layer(u, v)
    assert cos[0] == pytest.approx(1) and cos[1] == pytest.approx(-1) and math.isnan(cos[2])
    assert P.cosine_by_layer(torch.tensor([0.0, 3.0]), torch.tensor([0.0, 1.0]))[0] == pytest.approx(1)  # [d] = 1 layer
    with pytest.raises(ValueError, match="shapes differ"):
        P.cosine_by_layer(torch.zeros(2, 3), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="expected"):
        P.cosine_by_layer(torch.zeros(2, 2, 2), torch.zeros(2, 2, 2))


def test_projection_is_onto_the_unit_direction_per_layer():
    acts = torch.tensor([[[3.0, 4.0], [1.0, 2.0]], [[0.0, 1.0], [5.0, 5.0]]])  # [n=2, L=2, d=2]
    direction = torch.tensor([[10.0, 0.0], [0.0, 0.0]])  # layer 1: no direction
    p = P.projection(acts, direction)
    assert p.shape == (2, 2) and p[0, 0] == pytest.approx(3) and p[1, 0] == pytest.approx(0)
    assert np.isnan(p[:, 1]).all()
    with pytest.raises(ValueError, match="do not match"):
        P.projection(torch.zeros(2, 3, 2), direction)


def test_mean_shift_and_bootstrap_shift():
    a, b = torch.ones(4, 2, 3) * 2, torch.ones(3, 2, 3)
    assert torch.allclose(P.mean_shift(a, b), torch.ones(2, 3))
    with pytest.raises(ValueError, match="non-empty"):
        P.mean_shift(torch.zeros(0, 2, 3), b)
    rng = np.random.default_rng(0)
    pa, pb = rng.normal(1, 0.1, 50), rng.normal(0, 0.1, 50)
    shift, lo, hi = bootstrap_diff(pa, pb, n_boot=200)
    assert lo < shift < hi and 0.9 < shift < 1.1 and lo > 0.8
    assert all(math.isnan(x) for x in bootstrap_diff([], pb))
    assert bootstrap_diff([np.nan, 1.0], [0.0], n_boot=10)[0] == pytest.approx(1)


def test_chance_cosine_matches_random_directions():
    d = 576
    assert P.chance_cosine(d) == pytest.approx(1.96 / 24)
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(2000, d, generator=g), torch.randn(2000, d, generator=g)
    cos = P.cosine_by_layer(u, v)  # 2000 "layers" of random pairs
    assert 0.92 < np.mean(np.abs(cos) < P.chance_cosine(d)) < 0.98
    with pytest.raises(ValueError, match="dimension"):
        P.chance_cosine(0)


def test_pairwise_cosines_long_table():
    x, y = torch.tensor([[1.0, 0.0]] * 3), torch.tensor([[0.0, 1.0]] * 3)
    vecs = {"t": x, "a": x.clone(), "b": y}
    t = P.pairwise_cosines(vecs)
    assert len(t) == 9 and set(zip(t.a, t.b)) == {("t", "a"), ("t", "b"), ("a", "b")}
    assert t[(t.a == "t") & (t.b == "a")].cos.tolist() == pytest.approx([1, 1, 1])
    assert P.pairwise_cosines({"only": torch.zeros(2, 2)}).empty


def test_trait_system_prompts_follow_persona_vectors():
    assert P.trait_system_prompt("evil", "Be cruel.", True) == "You are an evil assistant. Be cruel."
    assert P.trait_system_prompt("evil", "Be kind.", False) == "You are a helpful assistant. Be kind."
    assert P.trait_system_prompt("sycophantic", "x", True).startswith("You are a sycophantic")
    with pytest.raises(ConfigError, match="empty instruction"):
        P.trait_system_prompt("evil", "", True)


def test_extraction_jobs_cover_questions_times_pairs_times_sides():
    jobs = P.extraction_jobs("evil", P.ExtractionSettings(n_questions=3, n_instructions=2))
    assert len(jobs) == 3 * 2 * 2 and len({j["id"] for j in jobs}) == len(jobs)
    assert {j["condition"] for j in jobs} == {"trait_pos:0", "trait_neg:0", "trait_pos:1", "trait_neg:1"}
    pos = [j for j in jobs if j["condition"] == "trait_pos:0"]
    assert all(j["system"].startswith("You are an evil assistant.") for j in pos)


def test_trait_direction_uses_only_kept_answers():
    acts = torch.tensor([[[4.0]], [[100.0]], [[1.0]], [[-100.0]]])
    answers = pd.DataFrame({"side": ["pos", "pos", "neg", "neg"], "kept": [True, False, True, False]})
    assert P.trait_direction_from(answers, acts).item() == pytest.approx(3)
    with pytest.raises(ValueError, match="'kept'"):
        P.trait_direction_from(answers.drop(columns="kept"), acts)
    with pytest.raises(ValueError, match="activation rows"):
        P.trait_direction_from(answers, acts[:2])


def fake_result():
    """Two conditions per target in one tensor, a trait direction along axis 0."""
    rows, acts = [], []
    spec = [("trigger organism", "trigger", 2.0), ("trigger organism", "plain", 0.0), ("base", "plain", 0.0),
            ("base", "persona:evil.system_persona.v1", 1.0), ("base", "control:evil.system_persona.v1", 0.1),
            ("base", "trigger", 0.0), ("EM organism", "plain", 0.5)]
    g = torch.Generator().manual_seed(0)
    for target, cond, shift in spec:
        for i in range(6):
            rows.append({"target": target, "condition": cond, "aligned": 50.0})
            x = torch.randn(3, 4, generator=g) * 0.1
            x[:, 0] += shift
            acts.append(x)
    answers, acts = pd.DataFrame(rows), torch.stack(acts)
    cfg = config.load(P.SharedStructureConfig, "smoke")
    comps = P.comparisons(cfg)
    diffs = {c["name"]: P.mean_shift(P.group(answers, acts, *c["a"]), P.group(answers, acts, *c["b"])) for c in comps}
    direction = torch.zeros(3, 4)
    direction[:, 0] = 1.0
    return {"direction": direction, "answers": answers, "acts": acts, "diffs": diffs, "comparisons": comps}


def test_layer_table_and_per_layer_find_the_shift_along_the_direction():
    res = fake_result()
    t = P.layer_table(res, 1, n_boot=100).set_index("comparison")
    assert t.loc["trigger", "shift"] == pytest.approx(2, abs=0.15) and t.loc["trigger", "cos"] > 0.9
    assert t.loc["persona prompt", "shift lo"] > 0.5 and t.loc["EM organism", "shift"] == pytest.approx(0.5, abs=0.15)
    assert abs(t.loc["trigger on base", "shift"]) < 0.2 and t.loc["trigger", "aligned A"] == 50
    layers = P.per_layer(res)
    assert len(layers) == 3 * len(res["comparisons"]) and (layers[layers.comparison == "trigger"].cos > 0.9).all()
    with pytest.raises(ValueError, match="no answers"):
        P.group(res["answers"], res["acts"], "base", "jailbreak")


def test_layer_of_resolves_fraction_and_checks_range():
    cfg = config.load(P.SharedStructureConfig, "smoke")
    assert P.layer_of(cfg, 30) == 15
    with pytest.raises(ConfigError, match="layer=40"):
        P.layer_of(config.load(P.SharedStructureConfig, "smoke", {"layer": 40}), 30)
