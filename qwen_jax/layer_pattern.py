"""The layer pattern as data: which layers are linear and which full.

`QwenConfig.layer_types` holds one name per layer, LINEAR (Gated DeltaNet)
or FULL (gated full attention); no module computes it from `i % 4`.
`layer_types_from_ratio` builds a pattern for attention-ratio studies (3:1
is Qwen3.5; "all-full" and "all-linear" work too),
`layer_types_from_placement` puts a number of full-attention layers at a
named depth (for placement studies), `layer_types_from_string` and
`pattern_string` read and write the short form "LLLF LLLF",
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
# A layer's feed-forward kind (`QwenConfig.mlp_types`), beside its mixer:
# the dense SwiGLU or the routed experts with a shared expert
# (`qwen_jax.moe`).
DENSE = "dense"
MOE = "moe"
MLP_KINDS = (DENSE, MOE)
# Named depths of the full-attention layers (`layer_types_from_placement`).
PLACEMENTS = ("periodic", "bottom", "top", "middle", "ends")


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


def layer_types_from_placement(placement: str, num_layers: int,
                               num_full: int) -> tuple[str, ...]:
  """`num_full` full-attention layers among `num_layers`, at a named depth.

  Layer 0 is the bottom (next to the embedding). With n layers and f full:

    periodic  spread evenly, each closing its group: layer floor((j + 1) *
              n / f) - 1 for j < f (where f divides n, the pattern of
              `layer_types_from_ratio`, as in Qwen3.5);
    bottom    layers 0 .. f - 1;
    top       layers n - f .. n - 1;
    middle    f consecutive layers from (n - f) // 2;
    ends      ceil(f / 2) at the bottom and floor(f / 2) at the top (f >= 2).

  Args:
    placement: one of `PLACEMENTS`.
    num_layers: total layers (>= 1).
    num_full: full-attention layers, 0 .. num_layers.

  Returns:
    A tuple of "linear_attention" / "full_attention" of length num_layers.

  Raises:
    ValueError: an unknown placement, counts out of range, or "ends" with
      fewer than two full layers.
  """
  if not isinstance(placement, str) or placement not in PLACEMENTS:
    raise ValueError(f"placement: expected one of {', '.join(PLACEMENTS)}, "
                     f"found {placement!r}")
  if not is_int(num_layers) or num_layers < 1:
    raise ValueError(f"num_layers: expected a positive integer, found "
                     f"{num_layers!r}")
  n = int(num_layers)
  if not is_int(num_full) or not 0 <= num_full <= n:
    raise ValueError(f"num_full: expected an integer in [0, num_layers={n}],"
                     f" found {num_full!r}")
  f = int(num_full)
  if placement == "periodic":
    full = {(j + 1) * n // f - 1 for j in range(f)}
  elif placement == "bottom":
    full = set(range(f))
  elif placement == "top":
    full = set(range(n - f, n))
  elif placement == "middle":
    start = (n - f) // 2
    full = set(range(start, start + f))
  else:  # ends
    if f < 2:
      raise ValueError(f"num_full: expected >= 2 for placement 'ends' (one "
                       f"full layer at each end), found {f}")
    full = set(range((f + 1) // 2)) | set(range(n - f // 2, n))
  return tuple(FULL if i in full else LINEAR for i in range(n))


_LETTERS = {"L": LINEAR, "F": FULL}


def layer_types_from_string(pattern: str) -> tuple[str, ...]:
  """Reads the short form: one letter per layer, L (linear) or F (full).

  Case and spaces are ignored: "LLLF LLLF" is 3:1 over eight layers.

  Raises:
    ValueError: not a string, no letter, or a letter other than L / F.
  """
  if not isinstance(pattern, str):
    raise ValueError(f"pattern: expected a string of L and F (one per "
                     f"layer), found {pattern!r}")
  letters = "".join(pattern.split()).upper()
  bad = sorted(set(letters) - set(_LETTERS))
  if not letters or bad:
    raise ValueError(f"pattern: expected letters L (linear) and F (full), "
                     f"one per layer, found {pattern!r}")
  return tuple(_LETTERS[c] for c in letters)


def pattern_string(layer_types: Sequence[str]) -> str:
  """The short form of a schedule: "LLLFLLLF" (one letter per layer)."""
  names = {v: k for k, v in _LETTERS.items()}
  try:
    return "".join(names[t] for t in layer_types)
  except KeyError as e:
    raise ValueError(f"layer_types: expected entries in {LAYER_KINDS}, found "
                     f"{e.args[0]!r}") from None
