"""Shape vocabulary used in docstrings and comments across the package.

  b  batch                 t  time (tokens)          s  key/value time
  d  model width           f  MLP width              V  vocabulary
  h  attention q heads     g  q heads per kv head    n  kv heads (GQA)
  e  attention head dim    c  chunk / conv channels
  hk Gated DeltaNet q/k heads   hv Gated DeltaNet v heads
  k  key dim (d_k)         v  value dim (d_v)
"""

from typing import Any

import jax

Array = jax.Array
PyTree = Any
