"""Model configuration: `QwenConfig` and the presets.

The layer schedule is data (`QwenConfig.layer_types`, built with the
helpers of `qwen_jax.layer_pattern`, re-exported here), never `i % 4` in a
module. Hugging Face config.json translation lives in `qwen_jax.hf_config`;
`QwenConfig.from_hf_config`, `to_hf_dict` and `to_hf_config` call it.

A config with a `vision` tower (a `qwen_jax.vision.VisionConfig`) is the
multimodal model, transformers' `Qwen3_5ForConditionalGeneration`; with
`vision=None` it is the text model alone (`Qwen3_5ForCausalLM`). The
published presets carry their towers; `from_preset(name, vision=None)` is
the same language model without one.

Example:
  cfg = QwenConfig.from_preset("qwen3.5-0.8b")               # with its tower
  text = QwenConfig.from_preset("qwen3.5-0.8b", vision=None)  # text only
  cfg = QwenConfig.from_preset("tiny", layer_types=layer_types_from_ratio(
      "1:1", 4))
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from qwen_jax import hf_config
# Re-exported: the package and its scripts import these from here.
# pylint: disable=unused-import
from qwen_jax.checks import check_int, is_int, is_real
from qwen_jax.layer_pattern import FULL, LAYER_KINDS, LINEAR
from qwen_jax.layer_pattern import DENSE, MLP_KINDS, MOE
from qwen_jax.layer_pattern import find_period
from qwen_jax.layer_pattern import layer_types_from_interval
from qwen_jax.layer_pattern import layer_types_from_ratio
# pylint: enable=unused-import
from qwen_jax.vision import VisionConfig

# Released Qwen3.5 models: of the 32 rotary frequencies, 11 follow the
# temporal row of the multimodal positions, 11 the height, 10 the width
# (transformers' default `rope_parameters["mrope_section"]`).
MROPE_SECTION = (11, 11, 10)

# The QwenConfig fields that change how the model is computed, not what it
# computes (the fields after "Implementation choices" in `QwenConfig`):
# precision, the layout of the layer stack, rematerialisation and the
# kernels. Configs that differ only in these compute the same function (up
# to rounding) from the same weights, so `load_hf_checkpoint` lets a caller
# override these fields and no others.
IMPLEMENTATION_FIELDS = ("dtype", "param_dtype", "scan_layers", "remat_policy",
                         "gdr_implementation", "gdr_interpret",
                         "gdr_chunk_size", "gdr_block_sizes",
                         "attention_implementation", "moe_implementation",
                         "moe_dispatch")

# Field types checked by `QwenConfig.validate`.
_POSITIVE_INT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size",
                        "num_hidden_layers", "num_attention_heads",
                        "num_key_value_heads", "head_dim",
                        "linear_num_key_heads", "linear_num_value_heads",
                        "linear_key_head_dim", "linear_value_head_dim",
                        "linear_conv_kernel_dim", "max_position_embeddings",
                        "gdr_chunk_size")  # a conv kernel of width 1 is legal
_FLOAT_FIELDS = ("rms_norm_eps", "rope_theta", "partial_rotary_factor",
                 "router_aux_loss_coef", "moe_capacity_factor")
# How tokens reach the experts over an expert mesh axis (moe_dispatch).
MOE_DISPATCHES = ("gather", "all_to_all")
# Mixture-of-experts sizes: integers >= 0 (0 experts: a dense model), each
# checked >= 1 when a layer is "moe".
MOE_SIZE_FIELDS = ("num_experts", "num_experts_per_tok",
                   "moe_intermediate_size",
                   "shared_expert_intermediate_size")
_BOOL_FIELDS = ("attention_bias", "tie_word_embeddings", "scan_layers",
                "gdr_interpret")
_TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")
# Placeholder ids of a multimodal model (transformers' `Qwen3_5Config`
# keeps them at the top level, beside `vision_config`).
VISION_TOKEN_FIELDS = ("image_token_id", "video_token_id",
                       "vision_start_token_id", "vision_end_token_id")
# transformers' defaults for them (`Qwen3_5Config`).
HF_VISION_TOKEN_IDS = {"image_token_id": 248056, "video_token_id": 248057,
                       "vision_start_token_id": 248053,
                       "vision_end_token_id": 248054}


@dataclasses.dataclass(frozen=True)
class QwenConfig:
  """Hyperparameters of a Qwen3.5 model: the language model and its tower.

  The fields mirror transformers' `Qwen3_5TextConfig` (same names), the
  multimodal `Qwen3_5Config`'s vision tower and placeholder ids, plus a few
  implementation choices at the end that do not change the math.

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
    mrope_section: how many of the rotary_dim / 2 frequencies follow the
      (t, h, w) rows of multimodal positions (interleaved; see
      `qwen_jax.mrope`). Text positions have three equal rows, so it only
      matters with images or videos. transformers reads it from
      `rope_parameters["mrope_section"]`.
    vision: the vision tower (`qwen_jax.vision.VisionConfig`), or None for
      a text-only model. Its dtype and param_dtype follow this config's.
    image_token_id, video_token_id: the placeholder each merged image or
      video token takes in a prompt; None where the model has none (images
      or videos are then refused).
    vision_start_token_id, vision_end_token_id: the ids around each image
      or video frame (metadata: prompts carry them, the model reads only
      the placeholders).
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
      "bwd_block=4096" (the backward in blocks: less memory),
      "output_in_state=True" or the preset "lean" (no per-chunk states
      stored: from 32k tokens a forward+backward holds fewer bytes than the
      per-chunk states alone would; `block_sizes.PRESETS`); "" for the
      defaults. Used only where the Pallas kernels run.
    attention_implementation: "xla" (the jnp attention) or "cudnn" (cuDNN's
      fused attention through jax.nn.dot_product_attention where it takes
      the inputs: causal attention without padding or packing masks, in
      training, forward passes and a prompt's first prefill block; the
      jnp attention elsewhere; `qwen_jax.attention`).
    mlp_types: per layer, "dense" (SwiGLU of intermediate_size) or "moe"
      (routed experts plus a gated shared expert, `qwen_jax.moe`). Default:
      every layer "moe" when num_experts > 0, else every layer "dense".
    num_experts: routed experts of each "moe" layer (0: a dense model).
    num_experts_per_tok: experts each token is routed to (top-k).
    moe_intermediate_size: SwiGLU width of each routed expert.
    shared_expert_intermediate_size: SwiGLU width of the shared expert.
    router_aux_loss_coef: weight of the router's load-balancing loss in
      training (transformers' `Qwen3_5MoeTextConfig` default 0.001).
    moe_implementation: "ragged" (tokens sorted by expert, one grouped
      matmul `jax.lax.ragged_dot`) or "dense" (every expert on every token,
      weighted by the routing: for tests and tiny models).
    moe_dispatch: how tokens reach the experts when a mesh splits them over
      its "expert" axis and the batch too: "gather" (each device gathers
      its expert group's tokens, runs its experts on the pairs routed to
      them, a reduce-scatter combines) or "all_to_all" (each device sends
      each (token, expert) pair to the device holding the expert and gets
      the result back: two all-to-alls of the routed pairs instead of a
      gather of every token; `qwen_jax.moe`). Both are dropless unless
      moe_capacity_factor is set. Ignored without an expert axis.
    moe_capacity_factor: "all_to_all" only: 0 sends every pair (dropless;
      buffers sized for the worst case, tokens * min(k, experts per
      device) per destination); c > 0 caps each destination's pairs from
      one device at ceil(c * tokens * k / devices) (an even share times c)
      and drops the pairs past it, as GShard and Switch Transformer do: a
      dropped pair adds nothing to its token, which keeps its other
      experts and the shared expert. Changes the function computed where
      a destination overflows; the train step reports the dropped share.
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
  mrope_section: tuple[int, int, int] = MROPE_SECTION
  vision: VisionConfig | None = None
  image_token_id: int | None = None
  video_token_id: int | None = None
  vision_start_token_id: int | None = None
  vision_end_token_id: int | None = None
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
  # Mixture of experts (after the implementation choices so that existing
  # positional uses are unchanged; only moe_implementation is one).
  mlp_types: tuple[str, ...] = ()
  num_experts: int = 0
  num_experts_per_tok: int = 8
  moe_intermediate_size: int = 512
  shared_expert_intermediate_size: int = 512
  router_aux_loss_coef: float = 0.001
  moe_implementation: str = "ragged"
  moe_dispatch: str = "gather"
  moe_capacity_factor: float = 0.0

  def __post_init__(self):
    self._check_types()
    lt = self.layer_types
    if not lt:
      lt = layer_types_from_interval(4, self.num_hidden_layers)
    object.__setattr__(self, "layer_types", tuple(lt))
    mt = self.mlp_types
    if not mt:
      mt = (MOE if self.num_experts > 0 else DENSE,) * len(lt)
    object.__setattr__(self, "mlp_types", tuple(mt))
    if self.vision is not None and (
        (self.vision.dtype, self.vision.param_dtype) !=
        (self.dtype, self.param_dtype)):
      # One compute and one parameter dtype for the whole model.
      object.__setattr__(self, "vision", self.vision.replace(
          dtype=self.dtype, param_dtype=self.param_dtype))
    self.validate()

  def _check_types(self) -> None:
    """Checks the numeric and bool fields' types; NumPy scalars become Python.

    Integer fields must be ints (not bools, floats or strings), float fields
    finite real numbers, bool fields bools: a string "false" would be truthy
    and a float vocab size fails deep inside JAX.
    """
    def bad(field, expected, found):
      raise ValueError(f"{field}: expected {expected}, found {found!r}")

    def put(field, value):
      object.__setattr__(self, field, value)

    for f in _POSITIVE_INT_FIELDS:
      x = getattr(self, f)
      if not is_int(x) or x < 1:
        bad(f, "a positive integer", x)
      put(f, int(x))
    for f in _FLOAT_FIELDS:
      x = getattr(self, f)
      if not is_real(x) or not math.isfinite(x):
        bad(f, "a finite real number", x)
      put(f, float(x))
    for f in _BOOL_FIELDS:
      x = getattr(self, f)
      if not isinstance(x, (bool, np.bool_)):
        bad(f, "True or False", x)
      put(f, bool(x))
    for f in VISION_TOKEN_FIELDS:
      x = getattr(self, f)
      if x is not None:
        if not is_int(x) or x < 0:
          bad(f, "an integer >= 0 or None", x)
        put(f, int(x))
    x = self.mrope_section
    if (not isinstance(x, (list, tuple)) or len(x) != 3 or
        not all(is_int(s) and s >= 0 for s in x)):
      bad("mrope_section", "three integers >= 0 (t, h, w)", x)
    put("mrope_section", tuple(int(s) for s in x))
    if self.vision is not None and not isinstance(self.vision,
                                                  VisionConfig):
      bad("vision", "a qwen_jax.vision.VisionConfig or None",
          type(self.vision).__name__)
    for f in MOE_SIZE_FIELDS:
      x = getattr(self, f)
      if not is_int(x) or x < 0:
        bad(f, "an integer >= 0", x)
      put(f, int(x))
    if isinstance(self.mlp_types, str):
      bad("mlp_types", "a sequence of MLP kind names", self.mlp_types)
    for f in _TOKEN_ID_FIELDS:
      x = getattr(self, f)
      if f == "eos_token_id" and isinstance(x, (list, tuple)):
        if not all(is_int(i) for i in x):
          bad(f, "an integer, a list of integers or None", x)
        put(f, tuple(int(i) for i in x))
      elif x is not None:
        if not is_int(x):
          bad(f, "an integer or None", x)
        put(f, int(x))
    for f in ("hidden_act", "dtype", "param_dtype", "remat_policy",
              "gdr_implementation", "gdr_block_sizes",
              "attention_implementation", "moe_implementation",
              "moe_dispatch"):
      if not isinstance(getattr(self, f), str):
        bad(f, "a string", getattr(self, f))
    if isinstance(self.layer_types, str):
      bad("layer_types", "a sequence of layer type names", self.layer_types)

  def validate(self) -> None:
    """Raises ValueError naming the first inconsistent field."""
    def bad(field, expected, found):
      raise ValueError(f"{field}: expected {expected}, found {found!r}")

    self._check_types()
    if len(self.layer_types) != self.num_hidden_layers:
      bad("layer_types", f"length num_hidden_layers={self.num_hidden_layers}",
          f"length {len(self.layer_types)}")
    for t in self.layer_types:
      if t not in LAYER_KINDS:
        bad("layer_types", f"entries in {LAYER_KINDS}", t)
    self._validate_moe(bad)
    if self.rope_theta <= 0:
      bad("rope_theta", "a RoPE base > 0", self.rope_theta)
    if self.rms_norm_eps < 0:
      bad("rms_norm_eps", "an epsilon >= 0", self.rms_norm_eps)
    if not 0 <= self.partial_rotary_factor <= 1:
      bad("partial_rotary_factor", "a fraction of head_dim in [0, 1]",
          self.partial_rotary_factor)
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
    if self.gdr_implementation != "auto":
      # Lazy: the names live with the kernels (jax is imported by then).
      # pylint: disable-next=g-import-not-at-top
      from pallas_kernels.gated_delta_rule import api as gdr_api
      names = ("auto",) + gdr_api.available_implementations()
      if self.gdr_implementation not in names:
        bad("gdr_implementation", f"one of {names}", self.gdr_implementation)
    if self.attention_implementation not in ("xla", "cudnn"):
      bad("attention_implementation", "'xla' or 'cudnn'",
          self.attention_implementation)
    for f in ("dtype", "param_dtype"):
      if getattr(self, f) not in ("float32", "bfloat16", "float16",
                                  "float64"):
        bad(f, "float32, bfloat16, float16 or float64", getattr(self, f))
    if self.vision is not None:
      if self.vision.out_hidden_size != self.hidden_size:
        bad("vision.out_hidden_size",
            f"the language model's hidden_size={self.hidden_size}",
            self.vision.out_hidden_size)
      ids = {f: getattr(self, f) for f in VISION_TOKEN_FIELDS
             if getattr(self, f) is not None}
      if len(set(ids.values())) != len(ids):
        bad("image_token_id, video_token_id, vision_start_token_id, "
            "vision_end_token_id", "different ids", ids)

  def _validate_moe(self, bad) -> None:
    """The MLP kinds and, when a layer is "moe", the experts' sizes."""
    if len(self.mlp_types) != self.num_hidden_layers:
      bad("mlp_types", f"length num_hidden_layers={self.num_hidden_layers}",
          f"length {len(self.mlp_types)}")
    for t in self.mlp_types:
      if t not in MLP_KINDS:
        bad("mlp_types", f"entries in {MLP_KINDS}", t)
    if self.moe_implementation not in ("ragged", "dense"):
      bad("moe_implementation", "'ragged' or 'dense'",
          self.moe_implementation)
    if self.moe_dispatch not in MOE_DISPATCHES:
      bad("moe_dispatch", f"one of {MOE_DISPATCHES}", self.moe_dispatch)
    if not self.moe_capacity_factor >= 0:
      bad("moe_capacity_factor", "0 (dropless) or a factor > 0",
          self.moe_capacity_factor)
    if self.moe_capacity_factor > 0 and self.moe_dispatch != "all_to_all":
      bad("moe_capacity_factor", "0 unless moe_dispatch='all_to_all' (the "
          "gather dispatch is dropless)", self.moe_capacity_factor)
    if self.router_aux_loss_coef < 0:
      bad("router_aux_loss_coef", "a weight >= 0", self.router_aux_loss_coef)
    if not self.is_moe:
      return
    for f in MOE_SIZE_FIELDS:
      if getattr(self, f) < 1:
        bad(f, "a positive integer when mlp_types has 'moe' layers",
            getattr(self, f))
    if self.num_experts_per_tok > self.num_experts:
      bad("num_experts_per_tok",
          f"at most num_experts={self.num_experts}",
          self.num_experts_per_tok)

  # ---------------------------------------------------------------- derived
  @property
  def is_moe(self) -> bool:
    """Whether any layer's MLP is the mixture of experts."""
    return MOE in self.mlp_types

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
  def spatial_merge_size(self) -> int | None:
    """m of the tower (m x m patches per language token), None without."""
    return None if self.vision is None else self.vision.spatial_merge_size

  @property
  def period(self) -> int:
    """Length of the repeating group of layers (mixer and MLP kinds)."""
    return find_period(tuple(zip(self.layer_types, self.mlp_types)))

  @property
  def num_periods(self) -> int:
    return self.num_hidden_layers // self.period

  def replace(self, **changes: Any) -> "QwenConfig":
    """A copy with fields changed.

    When num_hidden_layers changes and layer_types is not given, the current
    pattern's period (`find_period`) is repeated to the new length, so
    (full, lin, lin, lin) stays full-first. A length that is not a multiple
    of the period raises ValueError: pass layer_types (mlp_types) as well.
    """
    n = changes.get("num_hidden_layers")
    for field in ("layer_types", "mlp_types"):
      kinds = getattr(self, field)
      if (field in changes or not is_int(n) or n < 1 or len(kinds) == n):
        continue
      kinds = kinds[:self.period]
      if len(set(kinds)) == 1:
        kinds = kinds[:1]  # a uniform stack extends to any depth
      if n % len(kinds):
        raise ValueError(
            f"num_hidden_layers: expected a multiple of the layer pattern's "
            f"period {len(kinds)} {list(kinds)} to extend {field}, found "
            f"{n}; pass {field} as well")
      changes[field] = kinds * (n // len(kinds))
    if ("num_experts" in changes and "mlp_types" not in changes and
        len(set(self.mlp_types)) == 1 and
        "num_hidden_layers" not in changes):
      # A uniform stack follows the expert count: 0 experts is dense.
      changes["mlp_types"] = ()
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
    text part sits in `text_config`). Fields absent from the config take
    QwenConfig's defaults (the 9B model's). See `hf_config.config_from_hf`.

    Raises:
      ValueError: invalid JSON, an unsupported model_type or rope_type, a
        "qwen3_5" config without text_config, or a bad field value (the
        message names the field, and the file when `hf` is a path).
    """
    return hf_config.config_from_hf(cls, hf, overrides)

  def to_hf_dict(self) -> dict[str, Any]:
    """config.json contents: transformers' `Qwen3_5ForCausalLM`, or
    `Qwen3_5ForConditionalGeneration` when the config has a tower."""
    return hf_config.to_hf_dict(self)

  def to_hf_config(self):
    """transformers' `Qwen3_5TextConfig`, or `Qwen3_5Config` with a tower
    (needs the [hf] extra)."""
    return hf_config.to_hf_config(self)

  # ---------------------------------------------------------------- numbers
  def num_params(self) -> int:
    """Parameter count (tied head counted once, the tower included), from
    the shapes alone."""
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
    per_mlp = {DENSE: 3 * h * i, MOE: self.moe_mlp_params()}
    total = self.vocab_size * h + h
    if not self.tie_word_embeddings:
      total += self.vocab_size * h
    for t, m in zip(self.layer_types, self.mlp_types):
      total += 2 * h + per_mlp[m] + (per_full if t == FULL else per_lin)
    if self.vision is not None:
      total += self.vision.num_params()
    return total

  def moe_mlp_params(self, active: bool = False) -> int:
    """Parameters of one "moe" MLP: router, experts, shared expert and its
    gate; `active=True` counts only the experts a token is routed to."""
    h = self.hidden_size
    e = self.num_experts_per_tok if active else self.num_experts
    return (h * self.num_experts + e * 3 * h * self.moe_intermediate_size +
            3 * h * self.shared_expert_intermediate_size + h)


def _qwen35(name, hidden, layers, inter, heads, kv_heads, v_heads, tied,
            **moe):
  return QwenConfig(
      vocab_size=248320, hidden_size=hidden, intermediate_size=inter,
      num_hidden_layers=layers,
      layer_types=layer_types_from_ratio("3:1", layers),
      num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=256,
      linear_num_key_heads=16, linear_num_value_heads=v_heads,
      linear_key_head_dim=128, linear_value_head_dim=128,
      linear_conv_kernel_dim=4, rms_norm_eps=1e-6, rope_theta=1e7,
      partial_rotary_factor=0.25, max_position_embeddings=262144,
      tie_word_embeddings=tied, eos_token_id=248044,
      mrope_section=MROPE_SECTION,
      vision=VisionConfig.from_preset(name, out_hidden_size=hidden),
      **HF_VISION_TOKEN_IDS, **moe)


def _qwen35_moe(hidden, layers, heads, v_heads, experts, top_k, inter):
  """A published Qwen3.5 mixture-of-experts model (every layer "moe", one
  shared expert as wide as a routed one, the 9B's tower). Their config.json
  has no intermediate_size (no dense layer): it keeps QwenConfig's default,
  as a loaded config does."""
  return _qwen35("qwen3.5-9b", hidden, layers, 12288, heads, 2, v_heads,
                 False, num_experts=experts, num_experts_per_tok=top_k,
                 moe_intermediate_size=inter,
                 shared_expert_intermediate_size=inter)


_TINY = QwenConfig(
    vocab_size=256, hidden_size=64, intermediate_size=128,
    num_hidden_layers=4, layer_types=layer_types_from_ratio("3:1", 4),
    num_attention_heads=4, num_key_value_heads=2, head_dim=32,
    linear_num_key_heads=2, linear_num_value_heads=4,
    linear_key_head_dim=16, linear_value_head_dim=24,
    linear_conv_kernel_dim=4, rope_theta=1e7, partial_rotary_factor=0.25,
    max_position_embeddings=4096, tie_word_embeddings=True)

# The published models' hyperparameters, as their config.json files give
# them (the Qwen3.5 0.8B, 2B, 4B and 9B checkpoints, each
# `Qwen3_5ForConditionalGeneration`: the language model and its vision
# tower, `qwen_jax.vision.VISION_PRESETS`). `vision=None` gives the
# language model alone.
PRESETS: dict[str, QwenConfig] = {
    "qwen3.5-0.8b": _qwen35("qwen3.5-0.8b", 1024, 24, 3584, 8, 2, 16, True),
    "qwen3.5-2b": _qwen35("qwen3.5-2b", 2048, 24, 6144, 8, 2, 16, True),
    "qwen3.5-4b": _qwen35("qwen3.5-4b", 2560, 32, 9216, 16, 4, 32, True),
    "qwen3.5-9b": _qwen35("qwen3.5-9b", 4096, 32, 12288, 16, 4, 32, False),
    # The mixture-of-experts models (`Qwen3_5MoeForConditionalGeneration`):
    # hidden, layers, query heads, Gated DeltaNet value heads, experts,
    # experts per token, expert width.
    "qwen3.5-35b-a3b": _qwen35_moe(2048, 40, 16, 32, 256, 8, 512),
    "qwen3.5-122b-a10b": _qwen35_moe(3072, 48, 32, 64, 256, 8, 1024),
    "qwen3.5-397b-a17b": _qwen35_moe(4096, 60, 32, 64, 512, 10, 1024),
    # A few-MB model for tests, CPU demos and notebooks: the same structure
    # (3:1, GQA, GVA with r = 2, d_k != d_v, partial RoPE).
    "tiny": _TINY,
    # "tiny" with a two-block tower (`VisionConfig` preset "tiny": 4-pixel
    # patches, a 4 x 4 position table), for multimodal tests and demos. Its
    # 8 rotary dims give 4 frequencies: t, h, w, t. The placeholders take
    # the top ids of the 256-token vocabulary.
    "tiny-vl": _TINY.replace(
        vision=VisionConfig.from_preset("tiny"), mrope_section=(2, 1, 1),
        vision_start_token_id=252, vision_end_token_id=253,
        image_token_id=254, video_token_id=255),
    # "tiny" with 8 experts of width 32, two per token, and a shared expert
    # of width 48 in every layer (tests of the mixture of experts).
    "tiny-moe": _TINY.replace(
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
        shared_expert_intermediate_size=48),
}


def dtype_of(name: str):
  """jnp dtype from its name."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  return jnp.dtype(name)

