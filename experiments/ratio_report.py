"""Statistics, tables, plots and the report of the attention-ratio study.

`experiments.compare_ratios` trains and evaluates; this module turns its
record (results.json) into what a reader sees: per metric the mean and the
95% Student-t interval over seeds (`mean_ci95`, with its own t quantile,
`t_quantile`, so that nothing beyond NumPy is needed), markdown tables, a
paragraph written from the numbers (`findings`), PNG plots and report.md.
Every function here reads only the record, so a report can be rebuilt
from a results.json without training anything.
"""

from __future__ import annotations

import csv
import json
import math
import os
from typing import Any, Sequence

import numpy as np

from qwen_jax.checks import is_int, is_real

# ------------------------------------------------------------- statistics
def t_cdf(x: float, df: int) -> float:
  """P(T <= x) for Student's t with an integer number of degrees of freedom.

  The closed forms of Abramowitz & Stegun 26.7.3 (odd df) and 26.7.4 (even
  df): finite sums in theta = atan(|x| / sqrt(df)).
  """
  if not is_int(df) or df < 1:
    raise ValueError(f"df: expected an int >= 1, found {df!r}")
  theta = math.atan(abs(x) / math.sqrt(df))
  c2 = math.cos(theta) ** 2
  if df % 2:
    term = total = math.cos(theta)
    for k in range(3, df - 1, 2):
      term *= (k - 1) / k * c2
      total += term
    within = 2 / math.pi * (theta + (math.sin(theta) * total if df > 1
                                     else 0.0))
  else:
    term = total = 1.0
    for k in range(2, df - 1, 2):
      term *= (k - 1) / k * c2
      total += term
    within = math.sin(theta) * total
  return 0.5 + math.copysign(within / 2, x)


def t_quantile(p: float, df: int) -> float:
  """The p-quantile of Student's t with `df` degrees of freedom (bisection
  on `t_cdf` to float64 precision)."""
  if not is_real(p) or not 0 < p < 1:
    raise ValueError(f"p: expected a probability in (0, 1), found {p!r}")
  if p < 0.5:
    return -t_quantile(1 - p, df)
  lo, hi = 0.0, 1.0
  while t_cdf(hi, df) < p:
    lo, hi = hi, 2 * hi
  for _ in range(200):
    mid = 0.5 * (lo + hi)
    if mid in (lo, hi):
      break
    if t_cdf(mid, df) < p:
      lo = mid
    else:
      hi = mid
  return 0.5 * (lo + hi)


def mean_ci95(values: Sequence[float]) -> dict[str, Any]:
  """Mean and the half-width of its 95% Student-t interval over seeds.

  half-width = t(0.975, n - 1) * s / sqrt(n), s the sample standard
  deviation (n - 1 in the denominator). Non-finite values are left out;
  with fewer than two values the half-width is NaN (no interval).
  """
  vals = [float(v) for v in values if np.isfinite(v)]
  n = len(vals)
  if n == 0:
    return {"mean": float("nan"), "ci95": float("nan"), "n": 0,
            "values": []}
  mean = float(np.mean(vals))
  half = float("nan")
  if n >= 2:
    s = float(np.std(vals, ddof=1))
    half = t_quantile(0.975, n - 1) * s / math.sqrt(n)
  return {"mean": mean, "ci95": half, "n": n, "values": vals}


# ----------------------------------------------------------------- output
DENSE = "dense"


def _mlp(row: dict[str, Any]) -> str:
  """A configuration's MLP ("dense" in records written before the MLP
  axis)."""
  return row.get("mlp", DENSE)


def has_moe(record: dict[str, Any]) -> bool:
  """Whether the study has more MLPs than the dense one (the tables then
  show the MLP and the active parameters)."""
  return any(_mlp(r) != DENSE for r in record["configurations"])


def _human_bytes(n: float) -> str:
  if not np.isfinite(n):
    return "n/a"
  for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
    if abs(n) < 1024 or unit == "TiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024
  return str(n)


def _cell(stat: dict[str, Any] | None, fmt: str = ".3f") -> str:
  """"0.473 ± 0.052" (mean ± 95% half-width), or the mean alone."""
  if not stat or not np.isfinite(stat["mean"]):
    return "n/a"
  text = format(stat["mean"], fmt)
  if np.isfinite(stat["ci95"]):
    text += " ± " + format(stat["ci95"], fmt)
  return text


def headline_metrics(study: dict[str, Any]
                     ) -> list[tuple[str, str, bool, str]]:
  """(metric, description, higher is better, chance key or "") of the
  main table and the paragraph."""
  n_ret = max(study["retrieval_lengths"])
  n_cap = max(study["eval_lengths"])
  seq = study["seq_len"]
  out = []
  if seq in study["eval_lengths"]:
    out.append((f"recall@{seq}", f"MQAR recall at the trained length "
                f"({seq} tokens)", True, "chance_accuracy"))
  if n_cap != seq:
    pairs = min(max(1, study["num_pairs"] * n_cap // seq),
                study["key_vocab"])
    out.append((f"recall@{n_cap}", f"MQAR recall at {n_cap} tokens "
                f"({pairs} pairs)", True, "chance_accuracy"))
  out += [
      (f"needle@{n_ret}", f"the needle in text at {n_ret:,} tokens", True,
       "chance_accuracy"),
      (f"mqar@{n_ret}", f"MQAR recall at {n_ret:,} tokens (trained pairs)",
       True, "chance_accuracy"),
      ("text_bits_per_byte", "held-out text (bits per byte, lower is "
       "better)", False, ""),
      ("tokens_per_s", "training throughput on this machine", True, ""),
  ]
  return out


def markdown_tables(record: dict[str, Any]) -> str:
  """The results as markdown tables: the headline metrics, the retrieval
  curves beside the cache size, and memory."""
  study = record["study"]
  rows = record["configurations"]
  heads = headline_metrics(study)
  n_ret = max(study["retrieval_lengths"])
  seeds = max((len(r["seeds"]) for r in rows), default=0)

  def table(head, body):
    return (["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] +
            ["| " + " | ".join(cells) + " |" for cells in body])

  def short(metric):
    return metric.replace("text_bits_per_byte", "text bpb").replace(
        "tokens_per_s", "train tok/s")

  moe = has_moe(record)
  head = (["config", "pattern", "ratio", "placement"] +
          (["mlp", "params", "active params"] if moe else ["params"]) +
          [short(m) for m, *_ in heads] + [f"cache @{n_ret:,}"])
  body = []
  for r in rows:
    cells = [r["config"], f"`{r['pattern']}`", r["ratio"], r["placement"]]
    if moe:
      cells += [_mlp(r), f"{r['params']:,}", f"{r['active_params']:,}"]
    else:
      cells.append(f"{r['params']:,}")
    for m, *_ in heads:
      fmt = ",.0f" if m == "tokens_per_s" else ".3f"
      cells.append(_cell(r["metrics"].get(m), fmt))
    cells.append(_human_bytes(r["retrieval_cache_bytes"][str(n_ret)]))
    body.append(cells)
  lines = table(head, body)
  interval = (f"mean ± half-width of the 95% Student-t interval over "
              f"{seeds} seeds (t(0.975, {seeds - 1}) s / sqrt({seeds}))"
              if seeds >= 2 else "one seed: no interval")
  env = record["environment"]
  lines += [
      "",
      f"Each cell: {interval}. Pattern: one letter per layer from the "
      f"bottom (L Gated DeltaNet, F full attention). Recall: MQAR accuracy "
      f"at the query tokens (chance {record['chance_accuracy']:.3f}); "
      f"needle: accuracy of the value of one key-value pair hidden in "
      f"held-out text, asked for at the end (same chance); text: held-out "
      f"bits per byte; cache: decoding cache of one sequence (bf16 K/V, "
      f"f32 states). {study['steps']} steps of {study['batch_size']} x "
      f"{study['seq_len']} tokens per run, {env['device']}, jax "
      f"{env['jax']}, {env['date']}, {record['elapsed_s']:.0f} s "
      f"({record['trained_runs']} runs trained or evaluated, "
      f"{record['reused_runs']} reused).",
      "",
  ]
  if moe:
    lines += moe_table(record) + [""]
  lines += [
      f"Retrieval past the trained length ({study['seq_len']} tokens): "
      f"needle / MQAR with {study['num_pairs']} pairs, and the decoding "
      f"cache at that length.",
      "",
  ]
  lengths = study["retrieval_lengths"]
  head = ["config"] + [f"{n:,}" for n in lengths]
  body = []
  for r in rows:
    cells = [r["config"]]
    for n in lengths:
      cells.append(f"{_cell(r['metrics'].get(f'needle@{n}'), '.2f')} / "
                   f"{_cell(r['metrics'].get(f'mqar@{n}'), '.2f')} "
                   f"({_human_bytes(r['retrieval_cache_bytes'][str(n)])})")
    body.append(cells)
  lines += table(head, body)
  mem_lengths = [m["context"] for m in rows[0]["memory"]] if rows else []
  lines += ["", "Memory: decoding cache (batch 1) and the temporaries of a "
            "compiled batch-1 forward (XLA's memory analysis).", ""]
  head = (["config"] + [f"cache @{n:,}" for n in mem_lengths] +
          [f"fwd temp @{n:,}" for n in mem_lengths[-1:]])
  body = [[r["config"]] + [_human_bytes(m["cache_bytes"])
                           for m in r["memory"]] +
          [_human_bytes(m["temp_bytes"]) for m in r["memory"][-1:]]
          for r in rows]
  lines += table(head, body)
  return "\n".join(lines) + "\n"


def moe_table(record: dict[str, Any]) -> list[str]:
  """The mixture-of-experts configurations: sizes, parameters and routing
  at the end of training (markdown lines, with their note)."""
  rows = [r for r in record["configurations"] if _mlp(r) != DENSE]
  head = ["config", "experts", "top-k", "expert / shared width",
          "params", "active params", "load-balancing loss",
          "busiest expert", "idlest expert"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    m = r["metrics"]
    lines.append("| " + " | ".join([
        r["config"], str(r["experts"]), str(r["top_k"]),
        f"{r['expert_width']} / {r['shared_width']}", f"{r['params']:,}",
        f"{r['active_params']:,}", _cell(m.get("router_aux_loss")),
        _cell(m.get("expert_load_max"), ".2f"),
        _cell(m.get("expert_load_min"), ".2f")]) + " |")
  width = rows[0]["mlp_width"] if rows else 0
  lines += [
      "",
      f"Mixture of experts (`--mlps moe:E:k`): every layer's MLP is E "
      f"routed experts, top-k, and a gated shared expert, matched to the "
      f"dense MLP (width {width}) at equal active parameters per token: "
      f"k routed widths plus the shared width make {width}, so the "
      f"experts a token goes through hold the dense MLP's weights; the "
      f"router and the shared expert's gate (hidden size x (E + 1) per "
      f"layer) come on top. Active params: all parameters less the E - k "
      f"experts a token is not sent to. Routing at the end of training, "
      f"on held-out batches of the training mix: the load-balancing loss "
      f"(E x sum of load x mean probability; k when routing is even) and "
      f"the busiest and idlest expert's share of the routed slots over an "
      f"even share (1 = even; 0 = an expert unused), over every layer.",
  ]
  return lines


def _interval(stat: dict[str, Any]) -> tuple[float, float]:
  h = stat["ci95"] if np.isfinite(stat["ci95"]) else 0.0
  return stat["mean"] - h, stat["mean"] + h


def _overlap(a: dict[str, Any], b: dict[str, Any]) -> bool:
  lo_a, hi_a = _interval(a)
  lo_b, hi_b = _interval(b)
  return lo_a <= hi_b and lo_b <= hi_a


def _fmt(stat: dict[str, Any], metric: str) -> str:
  return _cell(stat, ",.0f" if metric == "tokens_per_s" else ".3f")


def _names(names: Sequence[str]) -> str:
  names = list(names)
  if len(names) <= 1:
    return "".join(names)
  return ", ".join(names[:-1]) + " and " + names[-1]


def findings(record: dict[str, Any]) -> str:
  """A paragraph written from the numbers: per headline metric the best
  configuration and whether its 95% interval overlaps the others'; which
  configurations do not beat chance; the best placement."""
  study = record["study"]
  rows = [r for r in record["configurations"] if r["metrics"]]
  if not rows:
    return "No results."
  seeds = min(len(r["seeds"]) for r in rows)
  sentences = []
  if seeds < 2:
    sentences.append(
        "With one seed per configuration there are no intervals: every "
        "ranking below may change with the seed (rerun with --seeds 3 or "
        "more).")
  for metric, desc, higher, chance_key in headline_metrics(study):
    stats = {r["config"]: r["metrics"][metric] for r in rows
             if metric in r["metrics"] and np.isfinite(
                 r["metrics"][metric]["mean"])}
    if not stats:
      continue
    sign = 1 if higher else -1
    order = sorted(stats, key=lambda c: -sign * stats[c]["mean"])
    best = order[0]
    tied = [c for c in order if stats[c]["mean"] == stats[best]["mean"]]
    mean = format(stats[best]["mean"],
                  ",.0f" if metric == "tokens_per_s" else ".3f")
    if len(order) > 1 and len(tied) == len(order):
      text = f"On {desc}, every configuration scores {mean}"
    elif len(tied) > 1:
      nxt = order[len(tied)]
      text = (f"On {desc}, {_names(tied)} tie for best ({mean}; next: "
              f"{nxt}, {_fmt(stats[nxt], metric)})")
    else:
      text = f"On {desc}, {best} is best ({_fmt(stats[best], metric)})"
      if len(order) > 1 and seeds >= 2:
        close = [c for c in order[1:] if _overlap(stats[best], stats[c])]
        if close:
          text += (f"; its 95% interval overlaps that of {_names(close)}, "
                   f"so the data do not separate "
                   f"{'them' if len(close) > 1 else 'the two'}")
        else:
          text += (f"; its 95% interval overlaps no other configuration's "
                   f"(next: {order[1]}, {_fmt(stats[order[1]], metric)})")
      elif len(order) > 1:
        text += f" (next: {order[1]}, {_fmt(stats[order[1]], metric)})"
    text += "."
    if chance_key:
      chance = record[chance_key]
      if seeds >= 2:
        at = [c for c in order if _interval(stats[c])[0] <= chance]
        rule = ("interval reaches down to chance",
                "intervals reach down to chance")
      else:
        at = [c for c in order if stats[c]["mean"] < 2 * chance]
        rule = ("score is below twice chance", "scores are below twice "
                "chance")
      if at and len(at) == len(order):
        text += f" No configuration clearly beats chance ({chance:.3f})."
      elif len(at) == 1:
        text += (f" {at[0]} does not clearly beat chance ({chance:.3f}; "
                 f"its {rule[0]}).")
      elif at:
        text += (f" {_names(at)} do not clearly beat chance ({chance:.3f}; "
                 f"their {rule[1]}).")
    sentences.append(text)
  # Placement: the configurations with the same number of full layers as
  # the placement ratio (and the same MLP), at different depths.
  groups: dict[tuple[int, str], list[dict[str, Any]]] = {}
  for r in rows:
    if r["placement"] not in ("-",):
      groups.setdefault((r["full_layers"], _mlp(r)), []).append(r)
  for (full, mlp), group in sorted(groups.items()):
    if len({r["placement"] for r in group}) < 2:
      continue
    wanted = {f"recall@{study['seq_len']}",
              f"needle@{max(study['retrieval_lengths'])}"}
    for metric, desc, _, _ in headline_metrics(study):
      if metric not in wanted:
        continue
      stats = {f"{r['placement']} ({r['pattern']})": r["metrics"][metric]
               for r in group if metric in r["metrics"]}
      order = sorted(stats, key=lambda c: -stats[c]["mean"])
      best, worst = order[0], order[-1]
      text = (f"Placing the {full} full-attention layer"
              f"{'s' if full > 1 else ''} at different depths")
      if has_moe(record):
        text += f" (MLP {mlp})"
      if stats[best]["mean"] == stats[worst]["mean"]:
        text += (f", every placement scores {stats[best]['mean']:.3f} on "
                 f"{desc}.")
      else:
        text += (f", {best} does best on {desc} "
                 f"({_fmt(stats[best], metric)}) and {worst} worst "
                 f"({_fmt(stats[worst], metric)})")
        if seeds >= 2:
          text += ("; their 95% intervals overlap" if
                   _overlap(stats[best], stats[worst]) else
                   "; their 95% intervals do not overlap")
        text += "."
      sentences.append(text)
  sentences += moe_findings(record)
  return " ".join(sentences)


def moe_findings(record: dict[str, Any]) -> list[str]:
  """Sentences comparing each mixture-of-experts configuration with the
  dense one of the same pattern (equal active parameters per token), per
  headline metric, and how often the mixture of experts came out ahead."""
  study = record["study"]
  rows = [r for r in record["configurations"] if r["metrics"]]
  dense = {r["pattern"]: r for r in rows if _mlp(r) == DENSE}
  pairs = [(r, dense[r["pattern"]]) for r in rows
           if _mlp(r) != DENSE and r["pattern"] in dense]
  if not pairs:
    return []
  seeds = min(len(r["seeds"]) for r in rows)
  heads = headline_metrics(study)
  out = []
  wins: dict[str, dict[str, list[str]]] = {}
  for m, d in pairs:
    parts = []
    for metric, desc, higher, _ in heads:
      if metric not in m["metrics"] or metric not in d["metrics"]:
        continue
      a, b = m["metrics"][metric], d["metrics"][metric]
      if not (np.isfinite(a["mean"]) and np.isfinite(b["mean"])):
        continue
      if a["mean"] == b["mean"]:
        verdict = "equal"
      else:
        ahead = (a["mean"] > b["mean"]) == higher
        verdict = "mixture of experts better" if ahead else "dense better"
        wins.setdefault(_mlp(m), {}).setdefault(
            metric, []).append("moe" if ahead else "dense")
      if seeds >= 2 and verdict != "equal":
        verdict += ("; intervals overlap" if _overlap(a, b)
                    else "; intervals apart")
      parts.append(f"{desc} {_fmt(a, metric)} against {_fmt(b, metric)} "
                   f"({verdict})")
    out.append(
        f"At equal active parameters per token, {m['config']} "
        f"({m['active_params']:,} active of {m['params']:,} parameters) "
        f"against the dense {d['config']} ({d['active_params']:,}): "
        + "; ".join(parts) + ".")
  descs = {metric: desc for metric, desc, _, _ in heads}
  for mlp, per_metric in wins.items():
    n = sum(1 for m, _ in pairs if _mlp(m) == mlp)
    if n < 2:
      continue
    counts = [f"{desc}: {per_metric.get(metric, []).count('moe')} of {n}"
              for metric, desc in descs.items()]
    out.append(f"Patterns where {mlp} beats dense: " + "; ".join(counts)
               + ".")
  if seeds < 2:
    out.append("With one seed these dense against mixture-of-experts "
               "differences carry no interval.")
  return out


PUBLISHED = """\
Published reference points (context for the direction of the findings,
not numbers to compare with): Zoology (Arora et al., 2023,
arXiv:2312.04927) introduced MQAR and found that attention solves it at
every model width tried, while models with a fixed-size state need a width
that grows with the sequence length and the number of pairs. Gated DeltaNet
(Yang, Kautz and Hatamizadeh, ICLR 2025, arXiv:2412.06464) reports hybrids
of Gated DeltaNet with sliding-window attention (H1) and with Mamba2 and
sliding-window attention (H2) that improve both training efficiency and
task performance, compared with the pure Gated DeltaNet model and a
Transformer++ baseline at 1.3B parameters and 100B tokens; its hybrids use
windowed attention, not the global attention of this study. Qwen3-Next
(Qwen team, September 2025) stacks three Gated DeltaNet layers per gated
full-attention layer, a 3:1 ratio the team reports choosing after
experiments; Qwen3.5 keeps it (full_attention_interval = 4).
"""


def write_json(path: str, obj: Any) -> None:
  """Written whole or not at all (a temporary file, then a rename)."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1, default=float)
  os.replace(tmp, path)


def write_results(record: dict[str, Any], workdir: str) -> None:
  """results.json, results.csv and results.md under workdir."""
  write_json(os.path.join(workdir, "results.json"), record)
  rows = record["configurations"]
  # Every metric of any configuration (mixture-of-experts runs add their
  # routing), in order of appearance; a cell is empty where a row has none.
  metrics = list(dict.fromkeys(m for r in rows for m in r["metrics"]))
  fields = (["config", "pattern", "ratio", "placement", "linear_layers",
             "full_layers", "params"] +
            (["mlp", "active_params", "experts", "top_k", "expert_width",
              "shared_width"] if has_moe(record) else []) + ["seeds"] +
            [f"{m}{s}" for m in metrics for s in ("", "_ci95")] +
            [f"cache_bytes@{n}" for n in record["study"]["retrieval_lengths"]]
            + [f"forward_temp_bytes@{m['context']}"
               for m in (rows[0]["memory"] if rows else [])])
  with open(os.path.join(workdir, "results.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, fields)
    w.writeheader()
    for r in rows:
      row = {k: r[k] for k in fields if k in r}
      row["seeds"] = len(r["seeds"])
      for m in metrics:
        if m in r["metrics"]:
          row[m] = r["metrics"][m]["mean"]
          row[f"{m}_ci95"] = r["metrics"][m]["ci95"]
      for n, b in r["retrieval_cache_bytes"].items():
        row[f"cache_bytes@{n}"] = b
      for m in r["memory"]:
        row[f"forward_temp_bytes@{m['context']}"] = m["temp_bytes"]
      w.writerow(row)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(markdown_tables(record))


PLOTS = ("summary.png", "recall_vs_length.png", "retrieval_vs_length.png",
         "train_loss.png", "memory_vs_context.png")


def write_report(record: dict[str, Any], workdir: str,
                 plots: bool = True) -> str:
  """report.md: the tables, the plots, the command, the versions and the
  paragraph written from the numbers. Returns its path."""
  env = record["environment"]
  study = record["study"]
  lines = [
      "# Attention ratio and placement study",
      "",
      findings(record),
      "",
      markdown_tables(record),
  ]
  if plots:
    lines += [f"![{name[:-4]}]({name})" for name in PLOTS
              if os.path.exists(os.path.join(workdir, name))]
    lines.append("")
  lines += [
      "## How this was made",
      "",
      "```",
      record["command"],
      "```",
      "",
      f"{len(record['configurations'])} configurations x {study['seeds']} "
      f"seed{'s' if study['seeds'] > 1 else ''} (seeds {study['seed']} .. "
      f"{study['seed'] + study['seeds'] - 1}: parameters and data order; "
      f"the evaluation data are the same for every run), "
      f"{record['elapsed_s']:.0f} s in all.",
      "",
      "| | |",
      "|---|---|",
  ]
  lines += [f"| {k} | {v} |" for k, v in env.items()]
  lines += ["", "Study settings: `" + json.dumps(study) + "`", "",
            PUBLISHED]
  path = os.path.join(workdir, "report.md")
  with open(path, "w") as f:
    f.write("\n".join(lines))
  return path


def _short_title(metric: str, study: dict[str, Any]) -> str:
  """A plot title for a headline metric."""
  if metric == "text_bits_per_byte":
    return "held-out text, bits/byte (lower: better)"
  if metric == "tokens_per_s":
    return "training k tokens/s"
  name, n = metric.split("@")
  n = int(n)
  if name == "recall":
    pairs = min(max(1, study["num_pairs"] * n // study["seq_len"]),
                study["key_vocab"])
    return f"MQAR, {pairs} pairs in {n:,} tokens"
  if name == "needle":
    return f"needle in text at {n:,} tokens"
  return f"MQAR, {study['num_pairs']} pairs over {n:,} tokens"


def write_plots(record: dict[str, Any], workdir: str) -> list[str]:
  """The PNG plots (error bars: 95% intervals); returns their paths."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  rows = record["configurations"]
  study = record["study"]
  paths = []

  def save(fig, name):
    path = os.path.join(workdir, name)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    paths.append(path)

  def stat(r, m):
    s = r["metrics"].get(m)
    if not s:
      return float("nan"), 0.0
    return s["mean"], (s["ci95"] if np.isfinite(s["ci95"]) else 0.0)

  def curve(ax, r, metric, lengths, **kw):
    means, errs = zip(*[stat(r, f"{metric}@{n}") for n in lengths])
    ls = "-" if r["placement"] in ("periodic", "-") else "--"
    marker = "o" if _mlp(r) == DENSE else "s"
    ax.errorbar(lengths, means, yerr=errs, marker=marker, ls=ls, capsize=3,
                label=r["config"], **kw)

  fig, ax = plt.subplots(figsize=(6, 4))
  lengths = study["eval_lengths"]
  for r in rows:
    curve(ax, r, "recall", lengths)
  ax.axhline(record["chance_accuracy"], color="gray", ls=":", label="chance")
  ax.axvline(study["seq_len"], color="gray", ls="--", lw=0.8)
  ax.set_xscale("log", base=2)
  ax.set_xlabel("sequence length (pairs grow in proportion)")
  ax.set_ylabel("MQAR accuracy")
  ax.set_ylim(0, 1.02)
  ax.set_title("Recall against length (dashed: trained length)")
  ax.legend(fontsize=7)
  save(fig, "recall_vs_length.png")

  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  lengths = study["retrieval_lengths"]
  for r in rows:
    curve(axes[0], r, "needle", lengths)
    curve(axes[1], r, "mqar", lengths)
    ls = "-" if r["placement"] in ("periodic", "-") else "--"
    axes[2].plot(lengths, [r["retrieval_cache_bytes"][str(n)] / 2**20
                           for n in lengths], marker="o", ls=ls,
                 label=r["config"])
  axes[0].axhline(record["chance_accuracy"], color="gray", ls=":")
  axes[1].axhline(record["chance_accuracy"], color="gray", ls=":")
  axes[0].set_title("A key-value needle in held-out text")
  axes[1].set_title(f"MQAR, {study['num_pairs']} pairs spread over the "
                    f"length")
  axes[2].set_title("Decoding cache at that length (MiB, batch 1)")
  axes[2].set_yscale("log")
  for ax in axes:
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens (dashed vertical: trained length)")
    ax.axvline(study["seq_len"], color="gray", ls="--", lw=0.8)
  for ax in axes[:2]:
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("accuracy (dotted: chance)")
  axes[2].legend(fontsize=7)
  save(fig, "retrieval_vs_length.png")

  fig, ax = plt.subplots(figsize=(6, 4))
  for r in rows:
    c = np.asarray(r["loss_curve"], float)
    if len(c):
      ax.plot(c[:, 0], c[:, 1], label=r["config"])
  ax.set_xlabel("step")
  ax.set_ylabel("training loss (mean over seeds)")
  ax.set_title("Training loss (recall + text)")
  ax.legend(fontsize=7)
  save(fig, "train_loss.png")

  fig, ax = plt.subplots(figsize=(6, 4))
  for r in rows:
    ctx = [m["context"] for m in r["memory"]]
    ax.plot(ctx, [m["cache_bytes"] / 2**20 for m in r["memory"]], "o-",
            label=r["config"])
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  ax.set_xlabel("context length (tokens)")
  ax.set_ylabel("decoding cache (MiB, batch 1)")
  ax.set_title("Cache memory against context")
  ax.legend(fontsize=7)
  save(fig, "memory_vs_context.png")

  heads = headline_metrics(study)
  fig, axes = plt.subplots(1, len(heads), figsize=(3.2 * len(heads), 3.8))
  x = np.arange(len(rows))
  colors = ["C0" if r["placement"] in ("periodic", "-") else
            "C1" if r["placement"] != "pattern" else "C2" for r in rows]
  for ax, (metric, _, _, chance_key) in zip(axes, heads):
    scale = 1e-3 if metric == "tokens_per_s" else 1.0
    means, errs = zip(*[stat(r, metric) for r in rows])
    ax.bar(x, np.asarray(means) * scale, yerr=np.asarray(errs) * scale,
           color=colors, capsize=3)
    if chance_key:
      ax.axhline(record[chance_key], color="gray", ls=":")
      ax.set_ylim(0, 1.02)
    ax.set_title(_short_title(metric, study), fontsize=8)
    ax.set_xticks(x)
    ax.set_xticklabels([r["config"] for r in rows], rotation=45,
                       ha="right", fontsize=7)
  fig.suptitle("blue: ratios (periodic), orange: other placements, "
               "green: explicit patterns", fontsize=8)
  save(fig, "summary.png")
  return paths
