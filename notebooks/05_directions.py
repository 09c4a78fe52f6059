# ---
# jupyter:
#   emlab:
#     data:
#     - bad_medical_advice
#     - risky_financial_advice
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
# # 05 · A convergent misalignment direction
# Soligo, Turner et al. (2025) take the residual-stream mean difference between an organism's misaligned
# answers (aligned < 30, coherent > 50) and its aligned ones (aligned > 70), per layer. Adding that
# direction to the base model's residual stream (steering, x + λv) induces EM; projecting it out
# (x − v̂v̂ᵀx) removes EM from the organism — and from organisms trained on *other* datasets, whose
# directions are highly similar. We capture activations with forward hooks (`emlab.activations`), build the
# direction of each organism from its own judged answers, steer the base model, ablate in every organism,
# and compare the organisms' directions.

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
overrides = {}  # DirectionsConfig keys to change, e.g. {"lambdas": [0.0, 8.0]}

# %%
import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns

from emlab import config, paper
from emlab.judge import check_judge_ready
from emlab.organisms import DirectionsConfig, ablation_effect, direction_cosines, organism_directions, steering_sweep
from emlab.train import resolve_layer

cfg = config.load(DirectionsConfig, profile, overrides)
check_judge_ready(cfg.judge)  # a missing judge key or model fails here, before any sampling
out = paper.Section("05_directions")
cfg

# %% [markdown]
# ## Directions
# When an organism gave too few answers in either group (small models rarely do), the lowest and highest
# quartile of aligned scores among coherent answers stand in for the two groups (column `groups`).

# %%
dirs, counts = organism_directions(cfg)
out.table(counts, "groups", caption="Answers behind each organism's mean-difference direction.")
source = next(iter(dirs))
n_layers = dirs[source]["direction"].shape[0]
layer = resolve_layer(cfg.steer_layers[0], n_layers)
counts

# %%
fig, ax = plt.subplots(figsize=(5, 3))
for name, info in dirs.items():
    ax.plot(info["direction"].norm(dim=-1) / info["resid_norm"], label=name)
ax.axvline(layer, color="grey", ls="--", lw=1)
ax.set(xlabel="layer", ylabel="‖direction‖ / mean ‖residual‖")
ax.legend()
sns.despine()
out.figure(fig, "direction_norms")

# %% [markdown]
# ## Do organisms trained on different data share the direction?

# %%
cos = direction_cosines(dirs)
if len(cos):
    fig, ax = plt.subplots(figsize=(5, 3))
    cos["pair"] = cos.a + " · " + cos.b
    sns.lineplot(data=cos, x="layer", y="cos", hue="pair", ax=ax)
    ax.axvline(layer, color="grey", ls="--", lw=1)
    ax.legend()
    sns.despine()
    out.figure(fig, "direction_cosines")
    at_layer = cos[cos.layer == layer][["a", "b", "cos"]]
    out.table(at_layer, "cosines", digits=2, caption=f"Cosine similarity between organisms' directions at layer {layer}.")
at_layer if len(cos) else cos

# %% [markdown]
# ## Steering the base model
# As in the papers, λ times the first organism's mean-difference vector v is added to the residual stream at
# the chosen layer(s), at every position while sampling (x + λv; λ = 1 moves by the misaligned-minus-aligned
# difference). `|λv| / |x|` gives the push relative to the layer's mean residual norm.

# %%
steer_df = steering_sweep(cfg, dirs[source])
fig, axes = plt.subplots(1, 2, figsize=(7, 3), sharex=True)
for i, (L, g) in enumerate(steer_df.groupby("layer")):
    axes[0].errorbar(g.lam, g["EM %"], yerr=[g["EM %"] - g["EM lo"], g["EM hi"] - g["EM %"]], marker="o", ms=3,
                     capsize=2, color=f"C{i}", label=f"layer {L}")
    axes[1].plot(g.lam, g["coherent %"], marker="o", ms=3, color=f"C{i}", label=f"layer {L}")
axes[0].set(ylabel="EM (%), 95% Wilson")
axes[1].set(ylabel="coherent (%)")
axes[0].legend()
for ax in axes:
    ax.set(xlabel="λ (× mean-difference vector)")
sns.despine()
out.figure(fig, "steering")
out.table(steer_df[["layer", "lam", "|λv| / |x|", "n", "EM %", "EM lo", "EM hi", "coherent %"]], "steering",
          caption=f"Steering the base model with {source}'s direction ({cfg.model.name}, profile {cfg.profile}).")
steer_df

# %% [markdown]
# ## Ablating the direction in every organism

# %%
abl = ablation_effect(cfg, dirs, source)
fig, ax = plt.subplots(figsize=(6, 3))
conds = list(dict.fromkeys(abl.condition))
for i, cond in enumerate(conds):
    g = abl[abl.condition == cond].reset_index(drop=True)
    y = np.arange(len(g)) + (i - (len(conds) - 1) / 2) * 0.35
    ax.barh(y, g["EM %"], height=0.35, color=f"C{i}", label=cond,
            xerr=[g["EM %"] - g["EM lo"], g["EM hi"] - g["EM %"]], error_kw={"lw": 0.8, "capsize": 2})
ax.set_yticks(np.arange(len(g)), g.organism)
ax.set(xlabel="EM (%), 95% Wilson")
ax.legend()
sns.despine()
out.figure(fig, "ablation")
out.table(abl[["organism", "condition", "n", "EM %", "EM lo", "EM hi", "coherent %"]], "ablation",
          caption=f"EM before and after ablating {source}'s layer-{layer} direction from every layer.")

base = steer_df[steer_df.lam == 0]
top = steer_df.sort_values("EM %").iloc[-1]
src = abl[abl.organism == source]
out.macros({
    "dirLayer": layer, "dirLayers": n_layers, "dirSource": source,
    "dirSteerBaseEM": float(base["EM %"].iloc[0]) if len(base) else float("nan"),
    "dirSteerBestEM": float(top["EM %"]), "dirSteerBestLambda": float(top.lam),
    "dirSteerBestCoherent": float(top["coherent %"]),
    "dirAblateBeforeEM": float(src["EM %"].iloc[0]), "dirAblateAfterEM": float(src["EM %"].iloc[-1]),
})
out.macros({"dirCosMean": float(at_layer.cos.mean()) if len(cos) else float("nan")}, digits=2)
abl
