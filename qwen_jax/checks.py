"""Value predicates shared by the package (configs, data, training, scripts).

A bool is an int to Python, never to a check here.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np


def is_int(x: Any) -> bool:
  """A Python or NumPy integer, not a bool."""
  return isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_))


def is_real(x: Any) -> bool:
  """An int or float (Python or NumPy), not a bool."""
  return isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_))


def check_int(name: str, value: Any, low: int) -> None:
  """Raises ValueError naming `name` unless `value` is an int >= low."""
  if not is_int(value) or value < low:
    raise ValueError(f"{name}: expected an int >= {low}, found {value!r}")
