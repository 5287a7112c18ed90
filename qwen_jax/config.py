"""Model configuration: `QwenConfig`, presets and layer-pattern helpers.

The layer schedule is data (`QwenConfig.layer_types`), never `i % 4` in a
module. `layer_types_from_ratio` builds the schedule for attention-ratio
studies (3:1 is Qwen3.5; "all-full" and "all-linear" work too).

Example:
  cfg = QwenConfig.from_preset("qwen3.5-0.8b")
  cfg = QwenConfig.from_preset("tiny", layer_types=layer_types_from_ratio(
      "1:1", 4))
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Sequence

LINEAR = "linear_attention"
FULL = "full_attention"
_LAYER_KINDS = (LINEAR, FULL)

# model_type values whose text path we implement.
TEXT_MODEL_TYPE = "qwen3_5_text"
VLM_MODEL_TYPE = "qwen3_5"
SUPPORTED_MODEL_TYPES = (TEXT_MODEL_TYPE, VLM_MODEL_TYPE)

# transformers falls back to this theta when `rope_theta` is absent.
HF_DEFAULT_ROPE_THETA = 10000.0


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
    lin, full = ratio
  if lin < 0 or full < 0 or lin + full == 0:
    raise ValueError(f"ratio: expected non-negative counts, not both zero; "
                     f"found {lin}:{full}")
  period = lin + full
  if num_layers < 1 or num_layers % period:
    raise ValueError(
        f"num_layers: expected a positive multiple of the ratio period "
        f"{period} "
        f"({lin}:{full}), found {num_layers}")
  group = (LINEAR,) * lin + (FULL,) * full
  return group * (num_layers // period)


def layer_types_from_interval(interval: int,
                              num_layers: int) -> tuple[str, ...]:
  """transformers' rule: layer i is full attention iff (i + 1) % interval == 0."""
  return tuple(FULL if (i + 1) % interval == 0 else LINEAR
               for i in range(num_layers))


def find_period(layer_types: Sequence[str]) -> int:
  """Smallest p such that the schedule is a repetition of its first p."""
  n = len(layer_types)
  for p in range(1, n + 1):
    if n % p == 0 and tuple(layer_types) == tuple(layer_types[:p]) * (n // p):
      return p
  return n


@dataclasses.dataclass(frozen=True)
class QwenConfig:
  """Hyperparameters of a Qwen3.5 dense text model.

  The fields mirror transformers' `Qwen3_5TextConfig` (same names), plus a
  few implementation choices at the end that do not change the math.

  Attributes:
    vocab_size: rows of the embedding and the LM head.
    hidden_size: model width d.
    intermediate_size: SwiGLU width.
    num_hidden_layers: number of decoder layers.
    layer_types: per layer, "linear_attention" or "full_attention".
    num_attention_heads: query heads of full attention.
    num_key_value_heads: KV heads of full attention (GQA).
    head_dim: per-head dim of full attention (not hidden / heads).
    linear_num_key_heads: Gated DeltaNet q/k heads.
    linear_num_value_heads: Gated DeltaNet v heads (a multiple of key heads).
    linear_key_head_dim: d_k of Gated DeltaNet.
    linear_value_head_dim: d_v of Gated DeltaNet.
    linear_conv_kernel_dim: causal depthwise conv width.
    rms_norm_eps: epsilon of every RMSNorm.
    rope_theta: RoPE base.
    partial_rotary_factor: fraction of head_dim that is rotated.
    max_position_embeddings: longest sequence the model accepts.
    attention_bias: biases on q/k/v/o projections.
    tie_word_embeddings: LM head shares the embedding matrix.
    hidden_act: MLP and conv activation (only "silu").
    bos_token_id, eos_token_id, pad_token_id: special ids (metadata).
    dtype: compute dtype name ("float32", "bfloat16").
    param_dtype: parameter dtype name.
    scan_layers: scan over repeats of the periodic layer pattern.
    remat_policy: "none", "full" or "dots" (rematerialisation per layer).
    gdr_implementation: gated delta rule backend ("auto", "chunked", ...).
    gdr_interpret: run Pallas kernels in interpret mode (CPU tests).
    gdr_chunk_size: tokens per chunk of the chunked gated delta rule (64
      matches transformers; smaller chunks are faster on a CPU for short
      sequences, the result is the same up to rounding).
    gdr_block_sizes: tiling of the Pallas gated delta rule as a
      `BlockSizes.from_spec` string over the backend's defaults, e.g.
      "bwd_block=4096" (the backward in blocks: less memory) or
      "output_in_state=True"; "" for the defaults. Used only where the
      Pallas kernels run.
    attention_implementation: "xla" or "cudnn" (jax.nn.dot_product_attention).
  """

  vocab_size: int = 248320
  hidden_size: int = 4096
  intermediate_size: int = 12288
  num_hidden_layers: int = 32
  layer_types: tuple[str, ...] = ()
  num_attention_heads: int = 16
  num_key_value_heads: int = 4
  head_dim: int = 256
  linear_num_key_heads: int = 16
  linear_num_value_heads: int = 32
  linear_key_head_dim: int = 128
  linear_value_head_dim: int = 128
  linear_conv_kernel_dim: int = 4
  rms_norm_eps: float = 1e-6
  rope_theta: float = 1e7
  partial_rotary_factor: float = 0.25
  max_position_embeddings: int = 262144
  attention_bias: bool = False
  tie_word_embeddings: bool = False
  hidden_act: str = "silu"
  bos_token_id: int | None = None
  eos_token_id: int | tuple[int, ...] | None = None
  pad_token_id: int | None = None
  # Implementation choices (no effect on the math).
  dtype: str = "float32"
  param_dtype: str = "float32"
  scan_layers: bool = True
  remat_policy: str = "none"
  gdr_implementation: str = "auto"
  gdr_interpret: bool = False
  gdr_chunk_size: int = 64
  gdr_block_sizes: str = ""
  attention_implementation: str = "xla"

  def __post_init__(self):
    lt = self.layer_types
    if not lt:
      lt = layer_types_from_interval(4, self.num_hidden_layers)
    object.__setattr__(self, "layer_types", tuple(lt))
    if isinstance(self.eos_token_id, list):
      object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
    self.validate()

  def validate(self) -> None:
    """Raises ValueError naming the first inconsistent field."""
    def bad(field, expected, found):
      raise ValueError(f"{field}: expected {expected}, found {found!r}")

    if len(self.layer_types) != self.num_hidden_layers:
      bad("layer_types", f"length num_hidden_layers={self.num_hidden_layers}",
          f"length {len(self.layer_types)}")
    for t in self.layer_types:
      if t not in _LAYER_KINDS:
        bad("layer_types", f"entries in {_LAYER_KINDS}", t)
    for f in ("vocab_size", "hidden_size", "intermediate_size",
              "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "linear_num_key_heads",
              "linear_num_value_heads", "linear_key_head_dim",
              "linear_value_head_dim", "linear_conv_kernel_dim",
              "max_position_embeddings", "gdr_chunk_size"):
      if int(getattr(self, f)) < 1:
        bad(f, "a positive integer", getattr(self, f))
    if self.num_attention_heads % self.num_key_value_heads:
      bad("num_attention_heads",
          f"a multiple of num_key_value_heads={self.num_key_value_heads}",
          self.num_attention_heads)
    if self.linear_num_value_heads % self.linear_num_key_heads:
      bad("linear_num_value_heads",
          f"a multiple of linear_num_key_heads={self.linear_num_key_heads}",
          self.linear_num_value_heads)
    rd = self.rotary_dim
    if rd % 2 or rd > self.head_dim:
      bad("partial_rotary_factor",
          f"an even rotary dim <= head_dim={self.head_dim}",
          f"{self.partial_rotary_factor} (rotary dim {rd})")
    if self.hidden_act not in ("silu", "swish"):
      bad("hidden_act", "'silu'", self.hidden_act)
    if self.remat_policy not in ("none", "full", "dots"):
      bad("remat_policy", "'none', 'full' or 'dots'", self.remat_policy)
    if self.gdr_block_sizes:
      # pylint: disable-next=g-import-not-at-top
      from pallas_kernels.gated_delta_rule import pallas_gdr
      try:  # the GPU defaults: the backend whose kernels take the most
        pallas_gdr.block_sizes_for("gpu", self.gdr_chunk_size,
                                   self.gdr_block_sizes)
      except ValueError as e:
        raise ValueError(f"gdr_block_sizes: {e}") from e
    if self.attention_implementation not in ("xla", "cudnn"):
      bad("attention_implementation", "'xla' or 'cudnn'",
          self.attention_implementation)
    for f in ("dtype", "param_dtype"):
      if getattr(self, f) not in ("float32", "bfloat16", "float16",
                                  "float64"):
        bad(f, "float32, bfloat16, float16 or float64", getattr(self, f))

  # ---------------------------------------------------------------- derived
  @property
  def rotary_dim(self) -> int:
    return int(self.head_dim * self.partial_rotary_factor)

  @property
  def linear_key_dim(self) -> int:
    return self.linear_num_key_heads * self.linear_key_head_dim

  @property
  def linear_value_dim(self) -> int:
    return self.linear_num_value_heads * self.linear_value_head_dim

  @property
  def linear_conv_dim(self) -> int:
    return 2 * self.linear_key_dim + self.linear_value_dim

  @property
  def period(self) -> int:
    """Length of the repeating group of layers."""
    return find_period(self.layer_types)

  @property
  def num_periods(self) -> int:
    return self.num_hidden_layers // self.period

  def replace(self, **changes: Any) -> "QwenConfig":
    """A copy with fields changed (layer_types re-derived if layers change)."""
    if ("num_hidden_layers" in changes and "layer_types" not in changes and
        len(self.layer_types) != changes["num_hidden_layers"]):
      ratio = (self.layer_types[:self.period].count(LINEAR),
               self.layer_types[:self.period].count(FULL))
      changes["layer_types"] = layer_types_from_ratio(
          ratio, changes["num_hidden_layers"])
    return dataclasses.replace(self, **changes)

  # ---------------------------------------------------------------- presets
  @classmethod
  def from_preset(cls, name: str, **overrides: Any) -> "QwenConfig":
    """A named preset (see `PRESETS`), with fields overridden."""
    if name not in PRESETS:
      raise ValueError(f"preset: expected one of {sorted(PRESETS)}, "
                       f"found {name!r}")
    return PRESETS[name].replace(**overrides)

  # ---------------------------------------------------- Hugging Face config
  @classmethod
  def from_hf_config(cls, hf: Any, **overrides: Any) -> "QwenConfig":
    """From a transformers config object, a config.json dict, or its path.

    Accepts model_type "qwen3_5_text" and the multimodal "qwen3_5" (whose
    text part sits in `text_config`).
    """
    if isinstance(hf, (str, os.PathLike)):
      path = os.fspath(hf)
      if os.path.isdir(path):
        path = os.path.join(path, "config.json")
      with open(path) as f:
        d = json.load(f)
    elif isinstance(hf, Mapping):
      d = dict(hf)
    else:
      d = hf.to_dict()
    model_type = d.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
      raise ValueError(f"model_type: expected one of {SUPPORTED_MODEL_TYPES},"
                       f" found {model_type!r}")
    if model_type == VLM_MODEL_TYPE:
      top = d
      d = dict(d.get("text_config") or {})
      if "tie_word_embeddings" in top:
        d["tie_word_embeddings"] = bool(
            top["tie_word_embeddings"] or d.get("tie_word_embeddings", False))
    rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
      raise ValueError(f"rope_parameters.rope_type: expected 'default', "
                       f"found {rope_type!r}")
    theta = rope.get("rope_theta", d.get("rope_theta", HF_DEFAULT_ROPE_THETA))
    prf = rope.get("partial_rotary_factor",
                   d.get("partial_rotary_factor", 0.25))
    n = int(d.get("num_hidden_layers", 32))
    layer_types = d.get("layer_types")
    if layer_types is None:
      layer_types = layer_types_from_interval(
          int(d.get("full_attention_interval", 4)), n)
    kw = {}
    for f in dataclasses.fields(cls):
      if f.name in d and f.name not in ("layer_types", "rope_theta",
                                        "partial_rotary_factor", "dtype"):
        kw[f.name] = d[f.name]
    kw.update(layer_types=tuple(layer_types), rope_theta=float(theta),
              partial_rotary_factor=float(prf), num_hidden_layers=n)
    kw.update(overrides)
    return cls(**kw)

  def to_hf_dict(self) -> dict[str, Any]:
    """config.json contents for transformers' `Qwen3_5ForCausalLM`."""
    d = {
        "architectures": ["Qwen3_5ForCausalLM"],
        "model_type": TEXT_MODEL_TYPE,
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_hidden_layers,
        "layer_types": list(self.layer_types),
        "num_attention_heads": self.num_attention_heads,
        "num_key_value_heads": self.num_key_value_heads,
        "head_dim": self.head_dim,
        "linear_num_key_heads": self.linear_num_key_heads,
        "linear_num_value_heads": self.linear_num_value_heads,
        "linear_key_head_dim": self.linear_key_head_dim,
        "linear_value_head_dim": self.linear_value_head_dim,
        "linear_conv_kernel_dim": self.linear_conv_kernel_dim,
        "rms_norm_eps": self.rms_norm_eps,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": self.rope_theta,
            "partial_rotary_factor": self.partial_rotary_factor,
        },
        "max_position_embeddings": self.max_position_embeddings,
        "attention_bias": self.attention_bias,
        "tie_word_embeddings": self.tie_word_embeddings,
        "hidden_act": self.hidden_act,
        "bos_token_id": self.bos_token_id,
        "eos_token_id": (list(self.eos_token_id)
                         if isinstance(self.eos_token_id, tuple)
                         else self.eos_token_id),
        "pad_token_id": self.pad_token_id,
        "dtype": self.param_dtype,
    }
    return d

  def to_hf_config(self):
    """transformers' `Qwen3_5TextConfig` (needs the [hf] extra)."""
    import transformers  # pylint: disable=g-import-not-at-top
    d = self.to_hf_dict()
    d.pop("architectures")
    d.pop("model_type")
    d.pop("dtype")
    return transformers.Qwen3_5TextConfig(**d)

  # ---------------------------------------------------------------- numbers
  def num_params(self) -> int:
    """Parameter count (tied head counted once), from the shapes alone."""
    h, i = self.hidden_size, self.intermediate_size
    per_full = (h * 2 * self.num_attention_heads * self.head_dim +
                2 * h * self.num_key_value_heads * self.head_dim +
                self.num_attention_heads * self.head_dim * h +
                2 * self.head_dim)
    if self.attention_bias:
      per_full += (2 * self.num_attention_heads * self.head_dim +
                   2 * self.num_key_value_heads * self.head_dim + h)
    nv = self.linear_num_value_heads
    per_lin = (h * self.linear_conv_dim + h * self.linear_value_dim +
               2 * h * nv + self.linear_conv_kernel_dim *
               self.linear_conv_dim + 2 * nv + self.linear_value_head_dim +
               self.linear_value_dim * h)
    per_layer = 3 * h * i + 2 * h
    total = self.vocab_size * h + h
    if not self.tie_word_embeddings:
      total += self.vocab_size * h
    for t in self.layer_types:
      total += per_layer + (per_full if t == FULL else per_lin)
    return total


def _qwen35(hidden, layers, inter, heads, kv_heads, v_heads, tied):
  return QwenConfig(
      vocab_size=248320, hidden_size=hidden, intermediate_size=inter,
      num_hidden_layers=layers,
      layer_types=layer_types_from_ratio("3:1", layers),
      num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=256,
      linear_num_key_heads=16, linear_num_value_heads=v_heads,
      linear_key_head_dim=128, linear_value_head_dim=128,
      linear_conv_kernel_dim=4, rms_norm_eps=1e-6, rope_theta=1e7,
      partial_rotary_factor=0.25, max_position_embeddings=262144,
      tie_word_embeddings=tied, eos_token_id=248044)


# Released hyperparameters (../shared/QWEN35_SPEC.md §1.3 gives the sources).
PRESETS: dict[str, QwenConfig] = {
    "qwen3.5-0.8b": _qwen35(1024, 24, 3584, 8, 2, 16, True),
    "qwen3.5-2b": _qwen35(2048, 24, 6144, 8, 2, 16, True),
    "qwen3.5-4b": _qwen35(2560, 32, 9216, 16, 4, 32, True),
    "qwen3.5-9b": _qwen35(4096, 32, 12288, 16, 4, 32, False),
    # A few-MB model for tests, CPU demos and notebooks: the same structure
    # (3:1, GQA, GVA with r = 2, d_k != d_v, partial RoPE).
    "tiny": QwenConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128,
        num_hidden_layers=4, layer_types=layer_types_from_ratio("3:1", 4),
        num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        linear_num_key_heads=2, linear_num_value_heads=4,
        linear_key_head_dim=16, linear_value_head_dim=24,
        linear_conv_kernel_dim=4, rope_theta=1e7, partial_rotary_factor=0.25,
        max_position_embeddings=4096, tie_word_embeddings=True),
}


def dtype_of(name: str):
  """jnp dtype from its name."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  return jnp.dtype(name)

