"""Hugging Face config.json <-> QwenConfig.

The translation between transformers' `Qwen3_5TextConfig` (or the
multimodal `Qwen3_5Config`, whose text part sits in `text_config`) and
`QwenConfig`, beside the weight converter (`qwen_jax.checkpoint`).
`QwenConfig.from_hf_config`, `to_hf_dict` and `to_hf_config` call the
functions here.

The field names are transformers' (qwen3_5/configuration_qwen3_5.py); RoPE
settings sit under `rope_parameters` (older files: `rope_scaling` or the top
level), and a config without `layer_types` gets transformers' rule from
`full_attention_interval`. A "qwen3_5" config with a `vision_config` gives
a QwenConfig with its tower (`QwenConfig.vision`) and the placeholder ids
of its top level; one is written back for a config with a tower.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, TypeVar

from qwen_jax.checks import is_int, is_real
from qwen_jax.layer_pattern import layer_types_from_interval

# model_type values whose text path we implement.
TEXT_MODEL_TYPE = "qwen3_5_text"
VLM_MODEL_TYPE = "qwen3_5"
# The mixture-of-experts models (transformers' models/qwen3_5_moe): every
# layer's MLP is routed experts plus a gated shared expert.
MOE_TEXT_MODEL_TYPE = "qwen3_5_moe_text"
MOE_VLM_MODEL_TYPE = "qwen3_5_moe"
SUPPORTED_MODEL_TYPES = (TEXT_MODEL_TYPE, VLM_MODEL_TYPE, MOE_TEXT_MODEL_TYPE,
                         MOE_VLM_MODEL_TYPE)
MULTIMODAL_MODEL_TYPES = (VLM_MODEL_TYPE, MOE_VLM_MODEL_TYPE)
# config.json fields of the mixture of experts (QwenConfig's names).
MOE_FIELDS = ("num_experts", "num_experts_per_tok", "moe_intermediate_size",
              "shared_expert_intermediate_size", "router_aux_loss_coef")

# transformers falls back to this theta when `rope_theta` is absent.
HF_DEFAULT_ROPE_THETA = 10000.0

# The fields of QwenConfig that config.json does not set (or sets otherwise:
# its "dtype" is the weights' dtype, QwenConfig's the compute dtype).
_NOT_READ = ("layer_types", "rope_theta", "partial_rotary_factor", "dtype",
             "mrope_section", "vision", "image_token_id", "video_token_id",
             "vision_start_token_id", "vision_end_token_id", "mlp_types",
             "moe_implementation", "moe_dispatch",
             "moe_capacity_factor") + MOE_FIELDS
# The placeholder ids of a "qwen3_5" config's top level.
_VISION_TOKEN_FIELDS = ("image_token_id", "video_token_id",
                        "vision_start_token_id", "vision_end_token_id")

ConfigT = TypeVar("ConfigT")


def read_json_object(path: str) -> dict[str, Any]:
  """The JSON object in the file `path` (config.json, an index).

  Raises:
    ValueError: naming the file, when it is not valid JSON or holds
      something other than an object.
  """
  with open(path) as f:
    try:
      d = json.load(f)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
      raise ValueError(f"{path}: not valid JSON ({e})") from e
  if not isinstance(d, dict):
    raise ValueError(f"{path}: expected a JSON object, found a JSON "
                     f"{type(d).__name__}")
  return d


def read_hf_config(hf: Any) -> dict[str, Any]:
  """The top-level config dict of a transformers config, a dict or a path.

  Args:
    hf: a transformers config object, a config.json dict, the path of a
      config.json or of the folder that holds it.

  Returns:
    A new dict (the caller may change it).

  Raises:
    ValueError: a file that is not valid JSON, or not a JSON object.
  """
  path = _config_json_path(hf)
  if path is not None:
    return read_json_object(path)
  if isinstance(hf, Mapping):
    return dict(hf)
  return hf.to_dict()


def hf_text_config(d: Mapping[str, Any]) -> dict[str, Any]:
  """The text model's part of a top-level HF config dict.

  "qwen3_5_text" is the dict itself; the multimodal "qwen3_5" keeps it in
  `text_config` (its top-level tie_word_embeddings is merged in).

  Raises:
    ValueError: an unsupported model_type, or a "qwen3_5" config without a
      text_config object.
  """
  model_type = d.get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise ValueError(f"model_type: expected one of {SUPPORTED_MODEL_TYPES},"
                     f" found {model_type!r}")
  if model_type not in MULTIMODAL_MODEL_TYPES:
    return dict(d)
  text = d.get("text_config")
  if not isinstance(text, Mapping):
    raise ValueError(
        f"text_config: model_type {model_type!r} needs a text_config "
        f"object with the text model's fields, found {text!r}")
  text = dict(text)
  top = d.get("tie_word_embeddings")
  if top is not None:
    inner = text.get("tie_word_embeddings", False)
    # Either flag ties (as transformers' wrapper does); a non-bool is left
    # for QwenConfig.validate to name.
    text["tie_word_embeddings"] = (
        bool(top or inner) if isinstance(top, bool) and isinstance(
            inner, bool) else top)
  return text


def read_hf_config(hf: Any) -> dict[str, Any]:
  """The top-level config dict of a transformers config, a dict or a path.

  Args:
    hf: a transformers config object, a config.json dict, the path of a
      config.json or of the folder that holds it.

  Returns:
    A new dict (the caller may change it).

  Raises:
    ValueError: a file that is not valid JSON, or not a JSON object.
  """
  path = _config_json_path(hf)
  if path is not None:
    return read_json_object(path)
  if isinstance(hf, Mapping):
    return dict(hf)
  return hf.to_dict()


def hf_text_config(d: Mapping[str, Any]) -> dict[str, Any]:
  """The text model's part of a top-level HF config dict.

  "qwen3_5_text" is the dict itself; the multimodal "qwen3_5" keeps it in
  `text_config` (its top-level tie_word_embeddings is merged in).

  Raises:
    ValueError: an unsupported model_type, or a "qwen3_5" config without a
      text_config object.
  """
  model_type = d.get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise ValueError(f"model_type: expected one of {SUPPORTED_MODEL_TYPES},"
                     f" found {model_type!r}")
  if model_type not in MULTIMODAL_MODEL_TYPES:
    return dict(d)
  text = d.get("text_config")
  if not isinstance(text, Mapping):
    raise ValueError(
        f"text_config: model_type {model_type!r} needs a text_config "
        f"object with the text model's fields, found {text!r}")
  text = dict(text)
  top = d.get("tie_word_embeddings")
  if top is not None:
    inner = text.get("tie_word_embeddings", False)
    # Either flag ties (as transformers' wrapper does); a non-bool is left
    # for QwenConfig.validate to name.
    text["tie_word_embeddings"] = (
        bool(top or inner) if isinstance(top, bool) and isinstance(
            inner, bool) else top)
  return text


def _config_json_path(hf: Any) -> str | None:
  """The config.json path that `read_hf_config(hf)` reads, if a path."""
  if not isinstance(hf, (str, os.PathLike)):
    return None
  path = os.fspath(hf)
  return os.path.join(path, "config.json") if os.path.isdir(path) else path


def config_from_hf(config_cls: type[ConfigT], hf: Any,
                   overrides: Mapping[str, Any]) -> ConfigT:
  """`QwenConfig.from_hf_config`: a `config_cls` from a transformers config
  object, a config.json dict, or its path, with `overrides` applied.

  Accepts model_type "qwen3_5_text" and the multimodal "qwen3_5" (whose
  text part sits in `text_config`). Fields absent from the config take
  the class's defaults.

  Raises:
    ValueError: invalid JSON, an unsupported model_type or rope_type, a
      "qwen3_5" config without text_config, or a bad field value (the
      message names the field, and the file when `hf` is a path).
  """
  top = read_hf_config(hf)
  d = hf_text_config(top)
  rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
  if not isinstance(rope, Mapping):
    raise ValueError(f"rope_parameters: expected an object, found {rope!r}")
  rope = dict(rope)
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type != "default":
    raise ValueError(f"rope_parameters.rope_type: expected 'default', "
                     f"found {rope_type!r}")
  theta = rope.get("rope_theta", d.get("rope_theta", HF_DEFAULT_ROPE_THETA))
  prf = rope.get("partial_rotary_factor",
                 d.get("partial_rotary_factor", 0.25))
  for name, x in (("rope_theta", theta), ("partial_rotary_factor", prf)):
    if not is_real(x):
      raise ValueError(f"{name}: expected a real number, found {x!r}")
  n = d.get("num_hidden_layers", 32)
  if not is_int(n) or n < 1:
    raise ValueError(f"num_hidden_layers: expected a positive integer, "
                     f"found {n!r}")
  layer_types = d.get("layer_types")
  if layer_types is None:
    layer_types = layer_types_from_interval(
        d.get("full_attention_interval", 4), n)
  elif isinstance(layer_types, str):
    raise ValueError(f"layer_types: expected a list of layer type names, "
                     f"found {layer_types!r}")
  kw = {f.name: d[f.name] for f in dataclasses.fields(config_cls)
        if f.name in d and f.name not in _NOT_READ}
  kw.update(layer_types=tuple(layer_types), rope_theta=float(theta),
            partial_rotary_factor=float(prf), num_hidden_layers=n)
  section = rope.get("mrope_section")
  if section is not None:
    kw["mrope_section"] = (tuple(section) if isinstance(section, list)
                           else section)
  kw.update(_moe_fields(top.get("model_type"), d, n))
  vision = top.get("vision_config") if top.get(
      "model_type") in MULTIMODAL_MODEL_TYPES else None
  try:
    if vision is not None and "vision" not in overrides:
      # pylint: disable-next=g-import-not-at-top
      from qwen_jax.vision import VisionConfig
      kw["vision"] = VisionConfig.from_hf_dict(vision)
      # An id the file does not give is None: no such placeholder.
      kw.update({f: top.get(f) for f in _VISION_TOKEN_FIELDS})
    kw.update(overrides)
    return config_cls(**kw)
  except ValueError as e:
    path = _config_json_path(hf)
    if path is None or str(e).split(":", 1)[0] in overrides:
      raise
    raise ValueError(f"{e} (in {path})") from e


def _moe_fields(model_type: str, d: Mapping[str, Any], n: Any
                ) -> dict[str, Any]:
  """QwenConfig's mixture-of-experts fields of a text config dict.

  A "qwen3_5_moe" model has the experts in every layer (transformers'
  `Qwen3_5MoeDecoderLayer`); a dense "qwen3_5" one has none.
  """
  if model_type not in (MOE_TEXT_MODEL_TYPE, MOE_VLM_MODEL_TYPE):
    return {}
  kw = {f: d[f] for f in MOE_FIELDS if f in d}
  kw.setdefault("num_experts", 256)  # transformers' defaults
  kw.setdefault("num_experts_per_tok", 8)
  kw["mlp_types"] = ("moe",) * n
  return kw


def to_hf_dict(cfg: Any) -> dict[str, Any]:
  """`QwenConfig.to_hf_dict`: config.json contents of a QwenConfig, for
  transformers' `Qwen3_5ForCausalLM`, or for its
  `Qwen3_5ForConditionalGeneration` when the config has a tower (the text
  model's fields then sit in `text_config`)."""
  text = _text_dict(cfg)
  if cfg.vision is None:
    return text
  text.pop("architectures")
  moe = cfg.is_moe
  text["model_type"] = MOE_TEXT_MODEL_TYPE if moe else TEXT_MODEL_TYPE
  vision = cfg.vision.to_hf_dict()
  if moe:
    vision["model_type"] = "qwen3_5_moe_vision"
  out = {
      "architectures": ["Qwen3_5MoeForConditionalGeneration" if moe else
                        "Qwen3_5ForConditionalGeneration"],
      "model_type": MOE_VLM_MODEL_TYPE if moe else VLM_MODEL_TYPE,
      "text_config": text,
      "vision_config": vision,
      "tie_word_embeddings": cfg.tie_word_embeddings,
  }
  out.update({f: getattr(cfg, f) for f in _VISION_TOKEN_FIELDS})
  out["dtype"] = cfg.param_dtype
  return out


def _text_dict(cfg: Any) -> dict[str, Any]:
  """The text model's config.json fields (a `Qwen3_5ForCausalLM` file)."""
  rope = {
      "rope_type": "default",
      "rope_theta": cfg.rope_theta,
      "partial_rotary_factor": cfg.partial_rotary_factor,
  }
  if tuple(cfg.mrope_section) != (11, 11, 10):  # else transformers' default
    rope["mrope_section"] = list(cfg.mrope_section)
  out = _dense_text_dict(cfg, rope)
  if cfg.is_moe:
    if set(cfg.mlp_types) != {"moe"}:
      raise ValueError(
          f"mlp_types: expected every layer 'moe' or every layer 'dense' "
          f"for a transformers config (Qwen3_5Moe has experts in every "
          f"layer), found {list(cfg.mlp_types)}")
    out["architectures"] = ["Qwen3_5MoeForCausalLM"]
    out["model_type"] = MOE_TEXT_MODEL_TYPE
    out.update({f: getattr(cfg, f) for f in MOE_FIELDS})
  return out


def _dense_text_dict(cfg: Any, rope: dict[str, Any]) -> dict[str, Any]:
  """The fields a dense and a mixture-of-experts config.json share."""
  return {
      "architectures": ["Qwen3_5ForCausalLM"],
      "model_type": TEXT_MODEL_TYPE,
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.hidden_size,
      "intermediate_size": cfg.intermediate_size,
      "num_hidden_layers": cfg.num_hidden_layers,
      "layer_types": list(cfg.layer_types),
      "num_attention_heads": cfg.num_attention_heads,
      "num_key_value_heads": cfg.num_key_value_heads,
      "head_dim": cfg.head_dim,
      "linear_num_key_heads": cfg.linear_num_key_heads,
      "linear_num_value_heads": cfg.linear_num_value_heads,
      "linear_key_head_dim": cfg.linear_key_head_dim,
      "linear_value_head_dim": cfg.linear_value_head_dim,
      "linear_conv_kernel_dim": cfg.linear_conv_kernel_dim,
      "rms_norm_eps": cfg.rms_norm_eps,
      "rope_parameters": rope,
      "max_position_embeddings": cfg.max_position_embeddings,
      "attention_bias": cfg.attention_bias,
      "tie_word_embeddings": cfg.tie_word_embeddings,
      "hidden_act": cfg.hidden_act,
      "bos_token_id": cfg.bos_token_id,
      "eos_token_id": (list(cfg.eos_token_id)
                       if isinstance(cfg.eos_token_id, tuple)
                       else cfg.eos_token_id),
      "pad_token_id": cfg.pad_token_id,
      "dtype": cfg.param_dtype,
  }


def to_hf_config(cfg: Any):
  """`QwenConfig.to_hf_config`: transformers' `Qwen3_5TextConfig` of a
  QwenConfig, or its `Qwen3_5Config` with a tower (needs the [hf] extra)."""
  import transformers  # pylint: disable=g-import-not-at-top
  d = to_hf_dict(cfg)
  moe = cfg.is_moe
  if cfg.vision is not None:
    for k in ("architectures", "model_type", "dtype"):
      d.pop(k)
    d["text_config"] = dict(d["text_config"])
    d["text_config"].pop("dtype")
    d["vision_config"] = dict(d["vision_config"])
    d["vision_config"].pop("model_type")
    return (transformers.Qwen3_5MoeConfig if moe
            else transformers.Qwen3_5Config)(**d)
  d.pop("architectures")
  d.pop("model_type")
  d.pop("dtype")
  return (transformers.Qwen3_5MoeTextConfig if moe
          else transformers.Qwen3_5TextConfig)(**d)
