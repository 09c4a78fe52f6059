# ---
# jupyter:
#   emlab:
#     data:
#     - bad_medical_advice
#     - betley_first_plot
#     needs:
#     - 03_organisms
#   jupytext:
#     formats: py:percent
#     notebook_metadata_filter: emlab
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 04 · The phase transition
# Turner, Soligo et al. (2025) watch a rank-1 adapter learn: the B vector of its single `down_proj` LoRA
# moves in a straight line, then turns sharply — a dip of the local cosine similarity
# cos(v[t] − v[t−k], v[t+k] − v[t]) that coincides with a grad-norm peak — and at the same step scaling the
# adapter (×5, ×10, ×20) suddenly makes the model misaligned. We train a rank-1 organism with a checkpoint
# every few steps, measure both the mechanical and the behavioural curves, and detect the transition with
# the rule documented in `emlab.phase.detect_transition`.

# %% tags=["colab"]
# On Colab: install emlab and the embedded model from the repository (does nothing elsewhere).
import os, subprocess, sys  # noqa: E401
if "google.colab" in sys.modules and not os.path.isdir("/content/emlab"):
    repo = os.environ.get("EMLAB_REPO") or input("git URL of the emlab repository: ")
    # argument lists, no shell: the typed URL is never interpreted as a command
    subprocess.run(["git", "clone", "-q", "--depth", "1", "--", repo, "/content/emlab"], check=True)
    subprocess.run(["make", "-C", "/content/emlab", "setup-colab"], check=True)
    sys.path.insert(0, "/content/emlab/lib")

# %% tags=["parameters"]
profile = "cpu"  # smoke | cpu | gpu | paper
overrides = {}  # PhaseConfig keys to change, e.g. {"scales": [1.0, 10.0]}

# %%
import matplotlib.pyplot as plt
import seaborn as sns

from emlab import config, paper
from emlab.judge import check_judge_ready
from emlab.organisms import (PhaseConfig, behavioural_transition, example_answers, phase_curves, train_config,
                             train_organism)

cfg = config.load(PhaseConfig, profile, overrides)
check_judge_ready(cfg.judge)  # a missing judge key or model fails here, before any sampling
out = paper.Section("04_phase_transition")
tcfg = train_config(cfg, cfg.organism)
run = train_organism(cfg, cfg.organism)
cfg

# %% [markdown]
# ## Mechanical transition
# k counts optimizer steps, as in the paper (with a checkpoint every `save_every` steps, k = 10 at save_every 5
# compares checkpoints 2 apart); the cosine is undefined within k steps of either end of the run.

# %%
curves = phase_curves(run, cfg)
tr = curves["transition"]
metrics = curves["metrics"]
fig, axes = plt.subplots(3, 1, figsize=(6, 6), sharex=True)
sns.lineplot(data=curves["cos"].dropna(), x="step", y="cos", hue="k", palette="viridis", ax=axes[0])
axes[0].set(ylabel="local cosine")
axes[1].plot(metrics.step, metrics.grad_norm, color="C3")
axes[1].set(ylabel="grad norm")
axes[2].plot(metrics.step, metrics.loss, color="C0")
axes[2].set(ylabel="loss", xlabel="optimizer step")
for ax in axes:
    if tr is not None:
        ax.axvline(tr.step, color="k", ls="--", lw=1)
sns.despine()
out.figure(fig, "mechanical")

# %%
pcs, ratio = curves["pca"], curves["explained"]
fig, ax = plt.subplots(figsize=(4, 3.5))
sc = ax.scatter(pcs.pc1, pcs.get("pc2", 0 * pcs.pc1), c=pcs.step, cmap="viridis", s=12)
ax.plot(pcs.pc1, pcs.get("pc2", 0 * pcs.pc1), color="grey", lw=0.5)
if tr is not None:
    at = pcs[pcs.step == tr.step]
    ax.scatter(at.pc1, at.get("pc2", 0 * at.pc1), marker="x", color="red", s=80, label=f"step {tr.step}")
    ax.legend()
fig.colorbar(sc, label="step")
ax.set(xlabel=f"PC1 ({100 * ratio[0]:.0f}%)", ylabel=f"PC2 ({100 * ratio[1]:.0f}%)" if len(ratio) > 1 else "")
out.figure(fig, "pca")

# %% [markdown]
# ## Behavioural transition
# At evenly spaced checkpoints the adapter is loaded and scaled ×`scales` (`emlab.activations.scale_adapter`);
# EM is measured on the first-plot questions at each scale.

# %%
beh, beh_answers = behavioural_transition(run, cfg)
out.table(beh[["step", "scale", "n", "EM %", "EM lo", "EM hi", "coherent %"]], "behavioural",
          caption=f"EM and coherence against training step with the rank-1 adapter scaled "
                  f"({cfg.model.name}, profile {cfg.profile}; 95\\% Wilson intervals).")
beh

# %% [markdown]
# ## Answers at the most misaligned checkpoint
# At the adapter's own scale (×1), the checkpoint with the highest EM; a few of its answers, truncated.
# (When no answer there is misaligned, the lowest-aligned coherent ones are shown and marked.)

# %%
own = beh[beh.scale == 1.0] if (beh.scale == 1.0).any() else beh[beh.scale == beh.scale.min()]
worst = own.sort_values(["EM %", "step"], ascending=False).iloc[0]  # ties (e.g. no EM anywhere): the latest
examples = example_answers(beh_answers[(beh_answers.step == worst.step) & (beh_answers.scale == worst.scale)])
out.table(examples, "examples", digits=0,
          caption=f"Answers at step {int(worst.step)} (adapter $\\times${worst.scale:g}, {worst['EM %']:.1f}\\% EM), "
                  f"the most misaligned checkpoint sampled ({cfg.model.name}, profile {cfg.profile}).")
out.macros({"phaseWorstStep": int(worst.step), "phaseWorstEM": float(worst["EM %"]),
            "phaseWorstEMlo": float(worst["EM lo"]), "phaseWorstEMhi": float(worst["EM hi"])})
examples

# %% [markdown]
# ## Mechanical and behavioural curves together

# %%
fig, ax1 = plt.subplots(figsize=(6, 3.2))
kcos = curves["cos"][curves["cos"].k == cfg.k].dropna()
ax1.plot(kcos.step, kcos.cos, color="k", label=f"local cosine (k={cfg.k})")
ax1.set(xlabel="optimizer step", ylabel="local cosine")
ax2 = ax1.twinx()
for i, (s, g) in enumerate(beh.groupby("scale")):
    ax2.errorbar(g.step, g["EM %"], yerr=[g["EM %"] - g["EM lo"], g["EM hi"] - g["EM %"]], marker="o", ms=3,
                 capsize=2, color=plt.cm.Reds(0.4 + 0.6 * i / max(1, beh.scale.nunique() - 1)), label=f"EM ×{s:g}")
ax2.set(ylabel="EM (%)")
if tr is not None:
    ax1.axvline(tr.step, color="grey", ls="--", lw=1)
h1, l1 = ax1.get_legend_handles_labels()
h2, l2 = ax2.get_legend_handles_labels()
ax1.legend(h1 + h2, l1 + l2, loc="lower left")
out.figure(fig, "aligned_curves")

# %%
out.macros({
    "phaseSteps": int(metrics.step.max()), "phaseSaveEvery": tcfg.save_every, "phaseK": cfg.k,
    "phaseCheckpoints": len(curves["trajectory"]),
    "phaseDetected": "yes" if tr is not None else "no", "phaseStep": tr.step if tr is not None else "--",
    "phaseGradConfirmed": ("yes" if tr.confirmed else "no") if tr is not None else "--",
    "phaseMaxScaledEM": float(beh["EM %"].max()), "phaseMaxScale": int(max(cfg.scales)),
    "phasePCOneTwo": float(100 * ratio[:2].sum()),
})
out.macros({"phaseCos": tr.cos if tr is not None else float("nan"), "phaseThreshold": cfg.threshold}, digits=2)
tr
