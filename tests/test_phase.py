"""Phase-transition analysis on synthetic run directories laid out like emlab.train's."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from emlab import phase

KEY = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"


def turning_path(n=81, turn=40, d=16, noise=0.002, seed=0):
    """A B-vector path that moves along e1, then turns 90° at checkpoint ``turn`` and moves along e2."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    v = np.zeros((n, d))
    v[:, 0] = np.minimum(t, turn)
    v[:, 1] = np.maximum(t - turn, 0)
    return v + noise * rng.standard_normal((n, d))


def write_run(tmp_path, vectors, every=5, grad_peak_step=None):
    ck = tmp_path / "checkpoints"
    ck.mkdir(parents=True)
    for i, v in enumerate(vectors):
        save_file({KEY: torch.tensor(v, dtype=torch.float32).unsqueeze(1),
                   KEY.replace("lora_B", "lora_A"): torch.ones(1, 8)}, str(ck / f"step_{i * every:05d}.safetensors"))
    steps = np.arange(1, len(vectors) * every)
    grad = np.ones(len(steps))
    if grad_peak_step is not None:
        grad[steps == grad_peak_step] = 4.0
    with (tmp_path / "metrics.jsonl").open("w") as f:
        for s, g in zip(steps, grad):
            f.write(json.dumps({"step": int(s), "loss": 1.0, "grad_norm": float(g), "lr": 1e-5}) + "\n")
    return tmp_path


def test_trajectory_reads_the_b_vector(tmp_path):
    v = turning_path(n=12)
    traj = phase.b_trajectory(write_run(tmp_path, v))
    assert traj.keys == (KEY,) and list(traj.steps) == list(range(0, 60, 5))
    np.testing.assert_allclose(traj.vectors, v, atol=1e-6)
    assert phase.b_trajectory(tmp_path, kind="A").vectors.shape == (12, 8)
    with pytest.raises(ValueError, match="no lora_B tensor matching"):
        phase.b_trajectory(tmp_path, module="layers.7.")


def test_local_cosine_straight_is_one_and_turn_is_a_dip():
    straight = np.outer(np.arange(30), np.ones(4))
    c = phase.local_cosine(straight, 5)
    assert np.isnan(c[:5]).all() and np.isnan(c[-5:]).all()
    np.testing.assert_allclose(c[5:-5], 1.0)
    c = phase.local_cosine(turning_path(noise=0), 10)
    assert np.nanargmin(c) == 40 and abs(c[40]) < 1e-9  # 90° turn: cosine 0 exactly at the corner


@pytest.mark.parametrize("k", phase.DEFAULT_KS)
def test_known_rotation_is_detected_at_its_step(tmp_path, k):
    run = write_run(tmp_path, turning_path(), grad_peak_step=203)
    tr = phase.run_transition(run, k=k)
    assert tr is not None and tr.step == 200 and tr.cos < 0.2
    assert tr.confirmed and tr.grad_peak_step == 203 and tr.grad_peak_ratio == pytest.approx(4.0)


def test_smooth_path_has_no_transition_and_missing_grad_peak_is_unconfirmed(tmp_path):
    rng = np.random.default_rng(1)
    straight = np.outer(np.arange(60), np.ones(8)) + 0.01 * rng.standard_normal((60, 8))
    assert phase.detect_transition(np.arange(60) * 5, phase.local_cosine(straight, 10)) is None
    run = write_run(tmp_path, turning_path())  # flat grad norm: rotation found but not confirmed
    tr = phase.run_transition(run)
    assert tr.step == 200 and not tr.confirmed


def test_local_cosines_table_and_pca(tmp_path):
    traj = phase.b_trajectory(write_run(tmp_path, turning_path(noise=0)))
    table = phase.local_cosines(traj)
    assert set(table.k) == {5, 10, 15} and len(table) == 3 * len(traj)
    pcs, ratio = phase.pca_trajectory(traj)
    assert list(pcs.columns) == ["step", "pc1", "pc2"] and ratio.sum() == pytest.approx(1.0)


def test_metrics_reader_reports_bad_lines(tmp_path):
    write_run(tmp_path, turning_path(n=4))
    df = phase.read_metrics(tmp_path)
    assert {"step", "loss", "grad_norm", "lr"} <= set(df.columns) and df.step.is_monotonic_increasing
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write("{oops\n")
    with pytest.raises(ValueError, match="metrics.jsonl:20"):
        phase.read_metrics(tmp_path)


def test_load_checkpoint_round_trip(tmp_path):
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1))
    model = get_peft_model(model, LoraConfig(r=1, target_modules=["down_proj"], layers_to_transform=[1]))
    state = {k: torch.randn_like(v) for k, v in get_peft_model_state_dict(model).items()}
    save_file(state, str(tmp_path / "step_00010.safetensors"))
    phase.load_checkpoint(model, tmp_path / "step_00010.safetensors")
    for k, v in get_peft_model_state_dict(model).items():
        torch.testing.assert_close(v, state[k])


def test_k_counts_optimizer_steps_as_in_the_paper(tmp_path):
    """The paper's k = 5/10/15 are optimizer steps (upstream converts them with steps_per_checkpoint);
    at save_every = 5, k = 10 is 2 checkpoints either side, and a k that is no multiple is refused."""
    v = turning_path(noise=0)
    traj = phase.b_trajectory(write_run(tmp_path, v, every=5))
    table = phase.local_cosines(traj, (10,))
    np.testing.assert_allclose(table.cos.to_numpy(), phase.local_cosine(v, 2), equal_nan=True)
    assert table.cos.isna().sum() == 4  # undefined within 10 steps (2 checkpoints) of either end
    with pytest.raises(ValueError, match="k=7 optimizer steps is not a positive multiple of the checkpoint spacing 5"):
        phase.local_cosines(traj, (7,))
    assert phase.checkpoint_offset(np.arange(0, 50, 1), 10) == 10  # per-step checkpoints: k steps = k checkpoints
