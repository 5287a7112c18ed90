"""The layer pattern as data: which layers are linear and which full.

`QwenConfig.layer_types` holds one name per layer, LINEAR (Gated DeltaNet)
or FULL (gated full attention); no module computes it from `i % 4`.
`layer_types_from_ratio` builds a pattern for attention-ratio studies (3:1
is Qwen3.5; "all-full" and "all-linear" work too),
`layer_types_from_interval` is transformers' rule for configs that give
only `full_attention_interval`, and `find_period` finds the repeating group
that a scanned stack loops over.
"""

from __future__ import annotations

from typing import Sequence

from qwen_jax.checks import is_int

LINEAR = "linear_attention"
FULL = "full_attention"
LAYER_KINDS = (LINEAR, FULL)


def layer_types_from_ratio(ratio: str | tuple[int, int],
                           num_layers: int) -> tuple[str, ...]:
  """Builds a layer schedule from a `linear:full` ratio.

  "3:1" gives [lin, lin, lin, full] repeated (full attention closes every
  group, as in Qwen3.5); "0:1" or "all-full" is all attention, "1:0" or
  "all-linear" is all Gated DeltaNet.

  Args:
    ratio: "L:F", (L, F), "all-full" or "all-linear".
    num_layers: total number of layers; must be a multiple of L + F.

  Returns:
    A tuple of "linear_attention" / "full_attention" of length num_layers.
  """
  if isinstance(ratio, str):
    name = ratio.strip().lower()
    if name in ("all-full", "all_full", "full"):
      lin, full = 0, 1
    elif name in ("all-linear", "all_linear", "linear"):
      lin, full = 1, 0
    else:
      try:
        lin, full = (int(x) for x in name.split(":"))
      except ValueError:
        raise ValueError(
            f"ratio: expected 'linear:full' such as '3:1', 'all-full' or "
            f"'all-linear', found {ratio!r}") from None
  else:
    if (not isinstance(ratio, (tuple, list)) or len(ratio) != 2 or
        not all(is_int(x) for x in ratio)):
      raise ValueError(
          f"ratio: expected 'linear:full' such as '3:1', 'all-full', "
          f"'all-linear' or a pair of integer counts (L, F), found {ratio!r}")
    lin, full = (int(x) for x in ratio)
  if lin < 0 or full < 0 or lin + full == 0:
    raise ValueError(f"ratio: expected non-negative counts, not both zero; "
                     f"found {lin}:{full}")
  period = lin + full
  if not is_int(num_layers):
    raise ValueError(f"num_layers: expected a positive integer, found "
                     f"{num_layers!r}")
  if num_layers < 1 or num_layers % period:
    raise ValueError(
        f"num_layers: expected a positive multiple of the ratio period "
        f"{period} "
        f"({lin}:{full}), found {num_layers}")
  group = (LINEAR,) * lin + (FULL,) * full
  return group * (num_layers // period)


def layer_types_from_interval(interval: int,
                              num_layers: int) -> tuple[str, ...]:
  """transformers' rule: layer i is full attention iff (i + 1) % interval
  == 0."""
  if not is_int(interval) or interval < 1:
    raise ValueError(f"full_attention_interval: expected a positive integer, "
                     f"found {interval!r}")
  if not is_int(num_layers) or num_layers < 0:
    raise ValueError(f"num_layers: expected a non-negative integer, found "
                     f"{num_layers!r}")
  return tuple(FULL if (i + 1) % interval == 0 else LINEAR
               for i in range(num_layers))


def find_period(layer_types: Sequence[str]) -> int:
  """Smallest p such that the schedule is a repetition of its first p."""
  n = len(layer_types)
  for p in range(1, n + 1):
    if n % p == 0 and tuple(layer_types) == tuple(layer_types[:p]) * (n // p):
      return p
  return n
