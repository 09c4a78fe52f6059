# ---
# jupyter:
#   emlab:
#     data:
#     - bad_medical_advice
#     - good_medical_advice
#     - risky_financial_advice
#     - extreme_sports
#     - insecure
#     - jailbroken
#     needs: []
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
# # 01 · Datasets
# The narrow fine-tuning sets behind every organism in this paper: Betley et al.'s insecure code and the
# Model-Organisms sets (bad / good medical advice, risky financial advice, extreme sports). We count their
# rows and tokens under the model's own tokenizer and compare how long their responses are — length matters
# because training cost and the loss share of each example scale with it.

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
overrides = {}  # config keys to change, e.g. {"token_rows": 200}; unknown keys are an error

# %%
import matplotlib as mpl
import matplotlib.pyplot as plt
import seaborn as sns

from emlab import config, models, paper
from emlab.analysis import DatasetsConfig, dataset_table, resources_table, response_lengths

cfg = config.load(DatasetsConfig, profile, overrides)
out = paper.Section("01_datasets")
tokenizer = models.load_tokenizer(cfg.model)
cfg

# %% [markdown]
# ## Size of the fine-tuning sets
# Tokens are counted on a seeded sample of `token_rows` rows per set and scaled to the full set.

# %%
lengths = response_lengths(cfg, tokenizer)
table = dataset_table(lengths)
out.table(table, "datasets", digits=2,
          caption=f"Fine-tuning datasets. Tokens under the {cfg.model.name} tokenizer, estimated from "
                  f"{lengths.groupby('dataset').size().min()} sampled rows per set.")
out.table(resources_table(), "resources", caption="Evaluation resources in the data registry.")
out.macros({"nTrainDatasets": len(table), "nTrainRows": int(table.rows.sum()),
            "nTrainTokensM": float(table["tokens (M)"].sum())}, digits=2)
table

# %% [markdown]
# ## Response lengths
# Insecure code answers are far longer than the advice sets' one-paragraph answers.

# %%
fig, ax = plt.subplots(figsize=(6, 3))
sns.boxplot(data=lengths, y="dataset", x="response_tokens", hue="dataset", ax=ax, showfliers=False,
            palette=paper.palette(lengths.dataset), legend=False)
ax.set(xlabel=f"response length ({cfg.model.name} tokens)", ylabel="", xscale="log")
ax.xaxis.set_major_formatter(mpl.ticker.StrMethodFormatter("{x:,.0f}"))  # 10, 100, 1,000: no overlapping 10^k
ax.xaxis.set_minor_formatter(mpl.ticker.NullFormatter())
sns.despine()
out.figure(fig, "response_lengths")
