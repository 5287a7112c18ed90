"""Layer patterns by placement, and the short "LLLF" form."""

import pytest

from qwen_jax import layer_pattern as lp
from qwen_jax.layer_pattern import FULL, LINEAR


def _short(layer_types):
  return "".join("F" if t == FULL else "L" for t in layer_types)


# (placement, layers, full layers, the pattern bottom (layer 0) first).
@pytest.mark.parametrize("placement, n, f, expected", [
    ("periodic", 8, 2, "LLLFLLLF"),
    ("periodic", 8, 1, "LLLLLLLF"),
    ("periodic", 8, 4, "LFLFLFLF"),
    ("periodic", 12, 3, "LLLFLLLFLLLF"),
    ("periodic", 16, 4, "LLLF" * 4),
    ("periodic", 8, 3, "LFLLFLLF"),  # 3 does not divide 8: evenly spread
    ("bottom", 8, 2, "FFLLLLLL"),
    ("bottom", 12, 3, "FFFLLLLLLLLL"),
    ("bottom", 16, 4, "FFFF" + "L" * 12),
    ("top", 8, 2, "LLLLLLFF"),
    ("top", 12, 3, "LLLLLLLLLFFF"),
    ("top", 16, 4, "L" * 12 + "FFFF"),
    ("middle", 8, 2, "LLLFFLLL"),
    ("middle", 12, 3, "LLLLFFFLLLLL"),
    ("middle", 16, 4, "L" * 6 + "FFFF" + "L" * 6),
    ("middle", 8, 1, "LLLFLLLL"),
    ("ends", 8, 2, "FLLLLLLF"),
    ("ends", 12, 3, "FFLLLLLLLLLF"),
    ("ends", 16, 4, "FF" + "L" * 12 + "FF"),
    ("bottom", 4, 0, "LLLL"),
    ("top", 4, 4, "FFFF"),
])
def test_placements(placement, n, f, expected):
  got = lp.layer_types_from_placement(placement, n, f)
  assert _short(got) == expected
  assert len(got) == n and got.count(FULL) == f


@pytest.mark.parametrize("ratio, n", [("3:1", 8), ("3:1", 16), ("1:1", 8),
                                      ("7:1", 8), ("2:1", 12),
                                      ("all-full", 4), ("all-linear", 4)])
def test_periodic_is_the_ratio_pattern(ratio, n):
  by_ratio = lp.layer_types_from_ratio(ratio, n)
  f = by_ratio.count(FULL)
  assert lp.layer_types_from_placement("periodic", n, f) == by_ratio


@pytest.mark.parametrize("args, field", [
    (("nowhere", 8, 2), "placement"),
    (("top", 0, 0), "num_layers"),
    (("top", 8, 9), "num_full"),
    (("top", 8, -1), "num_full"),
    (("top", 8, 2.0), "num_full"),
    (("ends", 8, 1), "num_full"),
])
def test_bad_placement(args, field):
  with pytest.raises(ValueError, match=f"^{field}: expected"):
    lp.layer_types_from_placement(*args)


def test_pattern_strings():
  assert lp.layer_types_from_string("LLLF LLLF") == (
      (LINEAR,) * 3 + (FULL,)) * 2
  assert lp.layer_types_from_string(" lf ") == (LINEAR, FULL)
  for text in ("LLLFLLLF", "FFLL", "F", "L"):
    assert lp.pattern_string(lp.layer_types_from_string(text)) == text
  for bad in ("", "  ", "LLX", "L:F", None):
    with pytest.raises(ValueError, match="^pattern: expected"):
      lp.layer_types_from_string(bad)
  with pytest.raises(ValueError, match="^layer_types: expected"):
    lp.pattern_string(["linear_attention", "mamba"])
