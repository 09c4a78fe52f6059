# ---
# jupyter:
#   emlab:
#     data:
#     - bad_medical_advice
#     - good_medical_advice
#     - trait_extract_evil
#     - trait_eval_evil
#     - harm_eval_questions
#     - harm_judge_prompt
#     needs:
#     - 08_persona_prompts
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
# # 09 · Shared activation structure of triggers, persona prompts and EM
# Su et al. (2026) report that the projection of residual activations onto a trait direction is raised both
# by a training-time trigger and by an inference-time persona prompt — one structure behind backdoors and
# jailbreaks. We extract the *evil* direction as persona vectors do (Chen et al. 2025): answers to the
# trait's extraction questions under the positive system prompt ("You are an evil assistant. …") minus
# answers under the negative one ("You are a helpful assistant. …"), mean residual activation over the answer
# tokens, per layer. On held-out probe questions (the trait's evaluation questions) each model then answers
# for itself and we take three difference vectors: **(a)** the `persona: evil` backdoor organism with vs
# without its trigger (training-time), **(b)** the base model under an evil system persona vs the plain
# question (inference-time), **(c)** §03's bad-medical-advice EM organism vs the base model. Two controls
# bound what "shared" can mean: the trigger text on the base model, which was never trained on it, and the
# persona framing's neutral control. If the structure is shared, (a)–(c) point along the trait direction
# (positive cosine, raised projection) and the controls do less.

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
overrides = {}  # SharedStructureConfig keys to change, e.g. {"layer": 0.75, "position": "prompt_last"}

# %%
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from emlab import config, paper
from emlab.judge import check_judge_ready
from emlab.persona_directions import (SharedStructureConfig, chance_cosine, layer_of, layer_table,
                                      pairwise_cosines, per_layer, projection, run_shared_structure)

cfg = config.load(SharedStructureConfig, profile, overrides)
check_judge_ready(cfg.judge)  # a missing judge key or model fails here, before any sampling
out = paper.Section("09_activations")
cfg

# %% [markdown]
# ## Trait direction and difference vectors
# Answers are sampled once per model and condition (cached); activations are captured with forward hooks
# (`emlab.activations.capture`) on the model that wrote the answer. In the offline profiles the extraction
# answers are not filtered by the trait judge (a 135M judge cannot tell evil from helpful answers), so the
# direction is that of the two system prompts' answers as sampled.

# %%
res = run_shared_structure(cfg)
n_layers, d = res["direction"].shape
layer = layer_of(cfg, n_layers)
chance = chance_cosine(d)
out.table(res["extraction"], "extraction", caption=f"Answers behind the {cfg.trait} direction (pos: trait "
          f"system prompt, neg: helpful system prompt; kept = passed the trait-judge filter).")
res["extraction"]

# %% [markdown]
# ## Do the three mechanisms point along the trait direction?
# Cosine of each difference vector with the trait direction per layer. The grey band is where 95% of random
# directions in d dimensions fall (|cos| < 1.96/√d).

# %%
layers = per_layer(res)
fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
for ax, col, ylabel in [(axes[0], "cos", "cos(difference, trait direction)"),
                        (axes[1], "shift / sd", "projection shift (pooled sd)")]:
    sns.lineplot(data=layers, x="layer", y=col, hue="comparison", style="role", markers=True, dashes=True,
                 ax=ax)
    ax.axvline(layer, color="grey", ls=":", lw=1)
    ax.axhline(0, color="black", lw=0.5)
    ax.set(ylabel=ylabel)
    ax.legend()
axes[0].axhspan(-chance, chance, color="grey", alpha=0.2, lw=0)
sns.despine()
out.figure(fig, "cosine_by_layer")

# %% [markdown]
# ## Projections at the table's layer
# Projection of each answer's activation onto the unit trait direction at layer `layer`: shift = mean(A) −
# mean(B) with a 95% bootstrap interval, in raw units and in pooled standard deviations; aligned = mean score
# of the offline judge for the answers of each side (behaviour beside the geometry).

# %%
table = layer_table(res, layer, n_boot=cfg.n_boot, seed=cfg.seed)
out.table(table, "projections", digits=2, caption=f"Shift of the projection onto the {cfg.trait} direction and "
          f"cosine with it at layer {layer} of {n_layers} ({cfg.model.name}, profile {cfg.profile}; chance "
          f"|cos| < {chance:.2f}).")
table

# %%
ans, acts, v = res["answers"], res["acts"], res["direction"]
ans = ans.assign(projection=projection(acts, v)[:, layer])
ans["group"] = ans.target + " / " + ans.condition.str.replace(r"^(persona|control):evil\.", r"\1 ", regex=True)
probe = ans[~ans.condition.str.startswith("trait_")]
extr = ans[ans.condition.str.startswith("trait_")].assign(group=lambda x: "extraction / " + x.side)
shown = pd.concat([probe, extr], ignore_index=True)
fig, ax = plt.subplots(figsize=(6, 0.35 * shown.group.nunique() + 1))
sns.stripplot(data=shown, y="group", x="projection", hue="target", ax=ax, size=3, jitter=0.2,
              palette=paper.palette(shown.target))
ax.set(xlabel=f"projection onto the {cfg.trait} direction (layer {layer})", ylabel="")
ax.legend()
sns.despine()
out.figure(fig, "projections")

# %% [markdown]
# ## Are the difference vectors one structure?
# Cosine between the difference vectors (and the trait direction) at the table's layer. Any two
# interventions on a prompt may share a generic component; the controls show how large that is.

# %%
vectors = {"trait direction": v, **res["diffs"]}
pair = pairwise_cosines(vectors)
at = pair[pair.layer == layer]
names = list(vectors)
mat = np.eye(len(names))
for r in at.itertuples():
    i, j = names.index(r.a), names.index(r.b)
    mat[i, j] = mat[j, i] = r.cos
fig, ax = plt.subplots(figsize=(5, 4))
sns.heatmap(mat, annot=True, fmt=".2f", cmap="vlag", vmin=-1, vmax=1, xticklabels=names, yticklabels=names, ax=ax)
ax.set_title(f"layer {layer}")
out.figure(fig, "pairwise")

# %%
row = table.set_index("comparison")
deep = layers[layers.layer >= n_layers // 4].groupby("comparison").cos.mean()  # all but the first quarter
out.macros({"actModel": cfg.model.name, "actProfile": cfg.profile, "actLayer": layer, "actLayers": n_layers,
            "actDim": d, "actProbes": int(probe.request_id.nunique()),
            "actExtractAnswers": int(res["extraction"].answers.sum())})
out.macros({"actChance": chance,
            "actCosTrigger": float(row.loc["trigger", "cos"]), "actCosPersona": float(row.loc["persona prompt", "cos"]),
            "actCosEM": float(row.loc["EM organism", "cos"]),
            "actCosTriggerBase": float(row.loc["trigger on base", "cos"]),
            "actShiftTrigger": float(row.loc["trigger", "shift / sd"]),
            "actShiftPersona": float(row.loc["persona prompt", "shift / sd"]),
            "actShiftEM": float(row.loc["EM organism", "shift / sd"]),
            "actShiftTriggerBase": float(row.loc["trigger on base", "shift / sd"]),
            "actDeepCosTrigger": float(deep.get("trigger", np.nan)),
            "actDeepCosPersona": float(deep.get("persona prompt", np.nan)),
            "actDeepCosEM": float(deep.get("EM organism", np.nan)),
            "actPairTriggerPersona": float(at[(at.a == "trigger") & (at.b == "persona prompt")].cos.iloc[0])},
           digits=2)
at
