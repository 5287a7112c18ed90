"""qwen-jax: a JAX/Flax reimplementation of the Qwen3.5 hybrid language model.

Public API:
  QwenConfig, Qwen35, load_hf_checkpoint, save_hf_checkpoint, generate,
  quantize (weights for decoding), layer_types_from_ratio,
  load_image_processor (a checkpoint's image and video preprocessing),
  load_tokenizer (its tokenizer).
"""

from qwen_jax.checkpoint import load_hf_checkpoint
from qwen_jax.checkpoint import save_hf_checkpoint
from qwen_jax.config import QwenConfig
from qwen_jax.config import layer_types_from_ratio
from qwen_jax.generate import generate
from qwen_jax.image_processing import load_image_processor
from qwen_jax.model import Qwen35
from qwen_jax.quantize import quantize
from qwen_jax.tokenizer import load_tokenizer

__all__ = [
    "QwenConfig",
    "Qwen35",
    "generate",
    "layer_types_from_ratio",
    "load_hf_checkpoint",
    "load_image_processor",
    "load_tokenizer",
    "quantize",
    "save_hf_checkpoint",
]

__version__ = "0.1.0"
