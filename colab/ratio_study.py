# %% [markdown]
# # What do the share and the place of full attention buy?
#
# Qwen3.5 interleaves three Gated DeltaNet (linear) layers with one gated
# full-attention layer. This notebook runs the project's study: the same
# small model with several layer patterns (equal depth and width; only the
# pattern changes) -- `linear:full` ratios from all-full to all-linear, and
# the same full-attention layers at other depths (bottom, top, ...) --
# trained for the same steps on the same batches of multi-query
# associative recall (MQAR) and byte-level text with a key-value "needle"
# hidden in it, each pattern with one or more seeds. It then measures
# recall at the trained length and longer, retrieval of the needle and of
# MQAR pairs far past the trained length beside the decoding cache each
# length needs, held-out bits per byte, training throughput and memory, and
# writes `report.md` with a 95% interval per number (over the seeds) and a
# paragraph written from the numbers.
#
# `PRESET = "smoke"` checks the plumbing in a few minutes on a CPU runtime
# (its numbers mean little). `"default"` is the README's main job (under
# 10 minutes on two CPU cores with one seed; `SEEDS = 3` for intervals).
# `"gpu"` is the study at tens of millions of parameters with retrieval to
# 64k tokens, for a GPU runtime. Every field of `StudyConfig` is
# documented; change any with `study.replace(...)`.
#
# On Colab, install first (a code cell):
# `%pip install "qwen-jax @ git+<this repository's URL>"`

# %%
import os
import tempfile

import jax

from experiments import compare_ratios as cr
from experiments import ratio_report

PRESET = "smoke"  # "default": the README's study; "gpu": on a GPU runtime
SEEDS = 1
study = cr.PRESETS[PRESET].replace(seeds=SEEDS)
print("jax", jax.__version__, "on", jax.default_backend())
print(study)

# %% [markdown]
# ## The models
# One config per layer pattern (L = Gated DeltaNet, F = full attention,
# bottom layer first); everything else is shared.

# %%
for conf in study.configurations():
  cfg = cr.model_config(study, conf)
  print(f"{conf.name:>12s}  {conf.pattern}  {conf.placement:>8s}  "
        f"{cfg.num_params():,} parameters")

# %% [markdown]
# ## Train and measure every pattern and seed
# Progress bars per run; checkpoints, metrics and results go under
# `workdir`. A rerun with the same `workdir` reuses the finished runs: with
# more seeds it trains only the new ones.

# %%
workdir = tempfile.mkdtemp(prefix="qwen_jax_ratios_")
record = cr.run_study(study, workdir)
print(ratio_report.markdown_tables(record))

# %% [markdown]
# ## What the numbers say
# Written from the numbers (best configuration per metric, whether the 95%
# intervals overlap, which configurations do not beat chance).

# %%
print(ratio_report.findings(record))

# %% [markdown]
# ## The plots
# A summary, recall against length, retrieval far past the trained length
# beside the cache size, training loss, memory against context.

# %%
pngs = [f for f in ratio_report.PLOTS
        if os.path.exists(os.path.join(workdir, f))]
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
# `record["configurations"]` holds one dict per pattern (mean, 95%
# half-width and the values of every metric), `record["runs"]` one per
# (pattern, seed); also `results.json`, `results.csv` and `report.md` in
# the workdir.

# %%
for row in record["configurations"]:
  m = row["metrics"]
  longest = max(study.retrieval_lengths)
  print(f"{row['config']:>12s}: recall@{study.seq_len} "
        f"{m[f'recall@{study.seq_len}']['mean']:.3f}, needle@{longest} "
        f"{m[f'needle@{longest}']['mean']:.3f}, text "
        f"{m['text_bits_per_byte']['mean']:.3f} bits/byte "
        f"({len(row['seeds'])} seed(s))")
assert ([r["config"] for r in record["configurations"]] ==
        [c.name for c in study.configurations()])
assert os.path.exists(os.path.join(workdir, "report.md"))
