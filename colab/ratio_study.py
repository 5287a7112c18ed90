# %% [markdown]
# # What does the ratio of linear to full attention buy?
#
# Qwen3.5 interleaves three Gated DeltaNet (linear) layers with one gated
# full-attention layer. This notebook runs the project's ratio study: the
# same small model at `all-full`, `1:1`, `3:1`, `7:1` and `all-linear`
# (equal depth and width; only the layer pattern changes), trained for the
# same steps on the same batches of multi-query associative recall (MQAR)
# and byte-level text, then measured for recall against length (longer
# than trained on), held-out bits per byte, training throughput and memory
# against context length.
#
# `PRESET = "smoke"` checks the plumbing in about two minutes on a CPU
# runtime (its numbers mean little). `"default"` is the README's main job:
# about eight minutes on two CPU cores, with 3:1 recall well above chance.
# On a GPU runtime, make the models and the budget larger with
# `study.replace(...)` (every field of `StudyConfig` is documented).
#
# On Colab, install first (a code cell):
# `%pip install "qwen-jax @ git+<this repository's URL>"`

# %%
import os
import tempfile

import jax

from experiments import compare_ratios as cr

PRESET = "smoke"  # "default": the README's study
study = cr.PRESETS[PRESET]
print("jax", jax.__version__, "on", jax.default_backend())
print(study)

# %% [markdown]
# ## The models
# One config per ratio; the pattern is data (`layer_types`), everything else
# is shared.

# %%
for ratio in study.ratios:
  cfg = cr.model_config(study, ratio)
  pattern = "".join("L" if t == "linear_attention" else "F"
                    for t in cfg.layer_types)
  print(f"{ratio:>10s}  {pattern}  {cfg.num_params():,} parameters")

# %% [markdown]
# ## Train and measure every ratio
# Progress bars per ratio; checkpoints, metrics and results go under
# `workdir` (a rerun with the same workdir resumes from the checkpoints).

# %%
workdir = tempfile.mkdtemp(prefix="qwen_jax_ratios_")
record = cr.run_study(study, workdir)
print(cr.markdown_table(record))

# %% [markdown]
# ## The plots
# Recall against length, training loss, memory against context, a summary.

# %%
pngs = sorted(f for f in os.listdir(workdir) if f.endswith(".png"))
print(pngs)
try:
  from IPython.display import Image, display  # in a notebook
except ImportError:  # run as a plain script (CI): the files are enough
  display = None
if display is not None:
  for name in pngs:
    display(Image(filename=os.path.join(workdir, name)))

# %% [markdown]
# ## The numbers, for your own analysis
# `record["results"]` holds one dict per ratio (also `results.json` and
# `results.csv` in the workdir).

# %%
chance = record["chance_accuracy"]
for row in record["results"]:
  recall = ", ".join(f"@{n} {a:.3f}" for n, a in row["recall"].items())
  print(f"{row['ratio']:>10s}: recall {recall} (chance {chance:.3f}); "
        f"text {row['text_bits_per_byte']:.3f} bits/byte")
assert {r["ratio"] for r in record["results"]} == set(study.ratios)
