"""Where each layer of the stack lives in the parameter and cache trees.

The decoder layers sit under params["layers"] (and a cache's "layers") in
named slots. When the layer pattern repeats and `cfg.scan_layers` is set,
the stack is a scan over periods: one slot per layer of the period
(`layer_0` ... `layer_{p-1}`), each leaf with a leading [num_periods] axis.
Otherwise every layer has its own slot `layer_{i}`, unstacked.

The model, the decoding cache and the checkpoint converter all read the
layout from here, so none of them needs to know how the others lay it out.
"""

from __future__ import annotations

from qwen_jax.config import QwenConfig


def is_scanned(cfg: QwenConfig) -> bool:
  """Whether the stack is a scan over repeated periods."""
  return cfg.scan_layers and cfg.num_periods > 1


def layer_location(cfg: QwenConfig, i: int) -> tuple[str, int | None]:
  """(slot name under params['layers'], index on the leading axis or None).

  Raises:
    ValueError: i outside [0, cfg.num_hidden_layers).
  """
  if not 0 <= i < cfg.num_hidden_layers:
    raise ValueError(f"layer index: expected 0 <= i < "
                     f"{cfg.num_hidden_layers}, found {i}")
  if is_scanned(cfg):
    return f"layer_{i % cfg.period}", i // cfg.period
  return f"layer_{i}", None


def stack_slots(cfg: QwenConfig) -> list[tuple[str, str]]:
  """(slot name, layer type) of each entry under params['layers']."""
  n = cfg.period if is_scanned(cfg) else cfg.num_hidden_layers
  return [(f"layer_{j}", cfg.layer_types[j]) for j in range(n)]


def leading_axes(cfg: QwenConfig) -> tuple[int, ...]:
  """The leading axes every leaf of a slot carries: (num_periods,) when
  scanned, else ()."""
  return (cfg.num_periods,) if is_scanned(cfg) else ()
