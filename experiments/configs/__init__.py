"""ml_collections configs for `experiments/train.py`, and their helpers.

Each config file has `get_config(arg=None) -> ConfigDict` with four parts:

  model  preset name, `ratio` ("3:1", "1:1", "all-full", ...), and every
         architecture field of `QwenConfig` as a placeholder (None keeps the
         preset's value), so `--config.model.hidden_size=256` works.
  train  every field of `qwen_jax.train_step.TrainConfig`.
  data   `kind` ("mqar" or "text") and its settings.
  eval   held-out batches evaluated after training.

`arg` is a comma-separated list in the big_vision style, e.g.
`--config=experiments/configs/mqar.py:runlocal,ratio=1:1,layers=8`:
a bare name switches a boolean on (`runlocal` shrinks everything for a
quick CPU run), `name=value` sets a value of the default's type.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import ml_collections
from ml_collections import config_dict

from qwen_jax.config import QwenConfig
from qwen_jax.train_step import TrainConfig

# QwenConfig fields that a config may set, by their annotated type; the
# tuple-valued `layer_types` is set through `ratio` instead, the token ids
# are metadata.
_SIMPLE_TYPES = {"int": int, "float": float, "bool": bool, "str": str}
_NOT_CONFIGURABLE = ("layer_types", "bos_token_id", "eos_token_id",
                     "pad_token_id")


def model_fields() -> dict[str, type]:
  """{QwenConfig field: Python type} of the fields a config may override."""
  out = {}
  for f in dataclasses.fields(QwenConfig):
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__",
                                                          "")
    if f.name not in _NOT_CONFIGURABLE and kind in _SIMPLE_TYPES:
      out[f.name] = _SIMPLE_TYPES[kind]
  return out


def model_config(preset: str, ratio: str | None = None,
                 **values: Any) -> ml_collections.ConfigDict:
  """The `model` part: preset, ratio, and a placeholder per QwenConfig field.

  Args:
    preset: a `QwenConfig` preset name ("tiny", "qwen3.5-0.8b", ...).
    ratio: "linear:full" layer ratio (None keeps the preset's schedule, or
      its ratio when the depth changes).
    **values: QwenConfig fields to set.

  Returns:
    A ConfigDict with `preset`, `ratio` and one entry per field.

  Raises:
    ValueError: a name that is not a configurable QwenConfig field.
  """
  fields = model_fields()
  unknown = sorted(set(values) - set(fields))
  if unknown:
    raise ValueError(f"model: expected QwenConfig fields among "
                     f"{sorted(fields)}, found {unknown}")
  cd = ml_collections.ConfigDict()
  cd.preset = preset
  cd.ratio = config_dict.placeholder(str)
  if ratio is not None:
    cd.ratio = ratio
  for name, kind in fields.items():
    cd[name] = config_dict.placeholder(kind)
    if values.get(name) is not None:
      cd[name] = values[name]
  return cd


def train_config(**values: Any) -> ml_collections.ConfigDict:
  """The `train` part: every TrainConfig field at its default, then `values`.

  Raises:
    ValueError: a name that is not a TrainConfig field.
  """
  defaults = dataclasses.asdict(TrainConfig())
  unknown = sorted(set(values) - set(defaults))
  if unknown:
    raise ValueError(f"train: expected TrainConfig fields, found {unknown}")
  defaults.update(values)
  return ml_collections.ConfigDict(defaults)


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses "runlocal,ratio=1:1,layers=8" against typed defaults.

  Args:
    arg: the string after ":" in `--config=path:arg` (None or "" = none).
    **defaults: every accepted name with its default; the default's type
      converts the value (bools accept a bare name, "true"/"false", 1/0).
      A default of None takes the value as a string.

  Returns:
    A ConfigDict of the defaults updated from `arg`.

  Raises:
    ValueError: an unknown name or a value of the wrong type.
  """
  out = dict(defaults)
  for item in (arg or "").split(","):
    item = item.strip()
    if not item:
      continue
    name, has_value, value = item.partition("=")
    name = name.strip()
    if name not in defaults:
      raise ValueError(f"config arg {name!r}: expected one of "
                       f"{sorted(defaults)}")
    default = defaults[name]
    if isinstance(default, bool):
      if not has_value:
        out[name] = True
      elif value.lower() in ("1", "true", "yes"):
        out[name] = True
      elif value.lower() in ("0", "false", "no"):
        out[name] = False
      else:
        raise ValueError(f"config arg {name}: expected a boolean, found "
                         f"{value!r}")
    elif not has_value:
      raise ValueError(f"config arg {name}: expected {name}=VALUE")
    elif default is None:
      out[name] = value
    else:
      try:
        out[name] = type(default)(value)
      except ValueError:
        raise ValueError(f"config arg {name}: expected a "
                         f"{type(default).__name__}, found {value!r}"
                         ) from None
  return ml_collections.ConfigDict(out)


def as_dict(cd: Mapping[str, Any] | ml_collections.ConfigDict
            ) -> dict[str, Any]:
  """A config part as a plain dict."""
  return cd.to_dict() if hasattr(cd, "to_dict") else dict(cd)


def build_train_config(
    train: Mapping[str, Any] | ml_collections.ConfigDict) -> TrainConfig:
  """TrainConfig from the `train` part of a config, its errors named by
  the config's path (`config.train.<field>`).

  Raises:
    ValueError: an unknown field, a value out of range, or a learning rate
      that is not > 0.
  """
  values = as_dict(train)
  names = {f.name for f in dataclasses.fields(TrainConfig)}
  unknown = sorted(set(values) - names)
  if unknown:
    raise ValueError(f"config.train: expected TrainConfig fields, found "
                     f"unknown {unknown}")
  try:
    # TrainConfig checks every field's type and range.
    tcfg = TrainConfig(**values)
  except ValueError as e:
    raise ValueError(str(e).replace("TrainConfig.", "config.train.", 1)
                     ) from None
  if not tcfg.learning_rate > 0:
    raise ValueError(f"config.train.learning_rate: expected > 0, found "
                     f"{tcfg.learning_rate}")
  return tcfg
