"""`Qwen35` refuses positions, segment ids and a cache index of a non-integer
dtype (a float array can hold NaN or 2.5: NaN positions give NaN logits, and
NaN document ids compare unequal to themselves, so a token attends to
nothing). The dtype is known under jit too, so the refusal holds there.

Every model here is the tiny preset with random weights.
"""

import functools

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qwen_jax
from qwen_jax import cache as cache_lib
from qwen_jax import QwenConfig
from tests import tolerances

B, T, VOCAB = 2, 10, 256


@functools.lru_cache(maxsize=None)
def _setup():
  cfg = QwenConfig.from_preset("tiny", gdr_chunk_size=8)
  model = qwen_jax.Qwen35(cfg)
  params = flax.linen.meta.unbox(jax.jit(model.init)(
      jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])
  return cfg, model, params


def _ids(seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, (B, T)),
                     jnp.int32)


def _apply(model, params, *args, **kw):
  return model.apply({"params": params}, *args, **kw)


def _positions(dtype, nan_at=None):
  pos = np.broadcast_to(np.arange(T), (B, T)).astype(dtype)
  if nan_at is not None:
    pos = pos.copy()
    pos[nan_at] = np.nan
  return pos


@pytest.mark.parametrize("case", ["float", "nan", "bool", "list_of_floats"])
def test_positions_must_be_integer(case):
  _, model, params = _setup()
  pos = {"float": lambda: jnp.asarray(_positions(np.float32)),
         "nan": lambda: _positions(np.float32, (1, 4)),
         "bool": lambda: _positions(np.int32) > 3,
         "list_of_floats": lambda: _positions(np.float64).tolist()}[case]()
  found = {"float": "float32", "nan": "float32", "bool": "bool",
           "list_of_floats": "float64"}[case]
  with pytest.raises(ValueError, match=r"positions: expected an integer array "
                     rf"of positions, found dtype {found}"):
    _apply(model, params, _ids(), positions=pos)


class FloatPositionsTest(chex.TestCase):
  """The dtype is known eagerly and under jit: refused in both."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_float_positions_refused(self):
    _, model, params = _setup()
    fn = self.variant(lambda p, i, pos: _apply(model, p, i, positions=pos))
    with pytest.raises(ValueError, match="positions: expected an integer"):
      fn(params, _ids(), jnp.asarray(_positions(np.float32)))


def test_integer_positions_of_any_width_accepted():
  _, model, params = _setup()
  ref = np.asarray(_apply(model, params, _ids(1)))  # default arange(t)
  for dtype in (np.int64, np.int16):
    got = _apply(model, params, _ids(1), positions=_positions(dtype))
    tolerances.assert_close(got, ref, "float32")


@pytest.mark.parametrize("dtype", [np.float32, np.float64, bool])
def test_segment_ids_must_be_integer(dtype):
  _, model, params = _setup()
  seg = np.ones((B, T), np.int32)
  seg[:, 5:] = 2
  seg = seg.astype(dtype)
  if dtype is np.float32:
    seg[0, 3] = np.nan
  with pytest.raises(ValueError, match=r"segment_ids: expected an integer "
                     rf"array of document ids, found dtype "
                     rf"{np.dtype(dtype).name}"):
    _apply(model, params, _ids(), segment_ids=seg)


@pytest.mark.parametrize("index", [np.float32(2.0), float("nan"), 2.5])
def test_cache_index_must_be_integer(index):
  cfg, model, params = _setup()
  cache = dict(cache_lib.init_cache(cfg, B, 16), index=index)
  with pytest.raises(ValueError, match=r"cache: expected an integer "
                     r"cache\['index'\].*found dtype float"):
    _apply(model, params, _ids()[:, :2], cache=cache)
