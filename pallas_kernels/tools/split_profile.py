"""Each kernel of the split gated delta rule as a call of its own.

For per-kernel profiles (`experiments.bench_gated_delta_rule
--profile_kernels`): the forward's and the backward's kernels run once in
order, unblocked, each through `jax.jit`, and each kernel's inputs are
kept, so every kernel can then be timed alone on the inputs it sees in
the pipeline. It uses the `stage` hook of `pallas_split._forward_all` and
`_backward_all`, which production calls leave as a plain call.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

# The pipeline's internals, on purpose: this module times them one by one.
# pylint: disable=protected-access
from pallas_kernels.gated_delta_rule import pallas_gdr
from pallas_kernels.gated_delta_rule import pallas_split
from pallas_kernels.gated_delta_rule.block_sizes import BlockSizes


def pipeline_stages(q, k, v, sc, s0, do, dst, cfg, sq) -> list[tuple]:
  """Every kernel of the forward and backward as (name, jitted fn, args,
  seconds of its first call: compilation and one run), on the padded
  inputs of `pallas_gdr` (q, k, v, scalars, initial state), cotangents
  do and dst, the kernels' `_Config` and its squeezed-dim marker `sq`.

  The args of each stage are the outputs of the stages before it,
  computed here once.
  """
  stages = []

  def run(name, fn, *args):
    fn = jax.jit(fn)
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    stages.append((name, fn, args, time.perf_counter() - start))
    return out

  # The kernels `forward` and `backward` run, unblocked, each timed.
  # recompute_states: the forward stores no states and the backward
  # starts from the initial state.
  recompute = cfg.block_sizes.recompute_states
  _, _, h = pallas_split._forward_all(q, k, v, sc, s0, cfg, sq,
                                      not recompute, stage=run)
  pallas_split._backward_all(q, k, v, sc, s0[:, :, None] if recompute else h,
                             do, dst, cfg, sq, recompute=bool(recompute),
                             stage=run)
  if recompute == "paired":
    # Its backward runs state_fwd and state_bwd (of neighbouring blocks)
    # in one launch: time them so, on the same inputs, in their place.
    names = [x[0] for x in stages]
    at_fwd, at_bwd = (names.index("state_fwd (backward)"),
                      names.index("state_bwd"))
    fwd_args, bwd_args = stages[at_fwd][2], stages[at_bwd][2]
    p = pallas_split._Plan(q, k, v, cfg, sq, backward=True)
    n = len(bwd_args)
    run("state_pair (state_bwd beside state_fwd)",
        lambda *a: pallas_split._paired(
            pallas_split._state_bwd(p, *a[:n], launch=False),
            pallas_split._state_fwd(p, *a[n:], h_whole=False, launch=False,
                                    entering=True),
            "state_pair").run(cfg), *bwd_args, *fwd_args)
    pair = stages.pop()
    stages[at_bwd] = pair
    del stages[at_fwd]
  return stages


def split_pipeline_stages(q, k, v, g, beta, *,
                          block_sizes: BlockSizes | None = None,
                          interpret: bool = False,
                          backend: str | None = None,
                          seed: int = 0) -> list[tuple]:
  """Each kernel of the split family on these inputs, for timing one by one.

  Same arguments as `pallas_gdr.gated_delta_rule_pallas` (no initial state
  or segments); the backward's cotangents are random. Returns
  `pipeline_stages`' list of (name, jitted fn, args, seconds of the first
  call).

  Raises:
    ValueError: when `block_sizes` (or the backend's defaults) name the
      fused kernels, which have no separate kernels to time.
  """
  qh, kh, vh, sc, s0, cfg = pallas_gdr._prepare(
      q, k, v, g, beta, None, None, None, block_sizes, interpret, backend)
  if cfg.block_sizes.kernels != "split":
    raise ValueError(f"block_sizes: expected the split kernels, found "
                     f"kernels={cfg.block_sizes.kernels!r}")
  rng = np.random.default_rng(seed)
  do = jnp.asarray(rng.normal(size=vh.shape), vh.dtype)
  dst = jnp.asarray(rng.normal(size=s0.shape), jnp.float32)
  return pipeline_stages(qh, kh, vh, sc, s0, do, dst, cfg, pallas_gdr._SQ)
