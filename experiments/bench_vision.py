"""Times the vision tower: images per second, against transformers' tower.

  ours          `qwen_jax.vision.encode` (jit, packed attention within each
                image) on --images square images of --image_size pixels
                per call, the tower of --preset with random weights.
  transformers  `Qwen3_5VisionModel` (torch, eager, CPU or the GPU torch
                sees) with the same weights, the same patches and grid, in
                the same process.

The table gives images/s of each and ours / theirs, and the largest
difference of the merged features relative to the largest one (they must
agree: the same weights run through both).

  # CPU, the 0.8B tower (the table of BENCHMARKS.md):
  python -m experiments.bench_vision --image_size 224 --images 4 --repeats 3
  # Without the baseline:
  python -m experiments.bench_vision --hf=false

Timings are medians of --repeats calls after one untimed (compiling) call.
Every flag is checked before a model is built; a misuse ends with one line
on stderr and exit status 1 (2 for usage errors); see experiments/cli.py.
"""

from __future__ import annotations

import datetime
import json
import platform
import statistics
import time
from typing import Any, Callable

from absl import flags
import jax
import numpy as np

from experiments import cli
from qwen_jax import vision

_PRESET = flags.DEFINE_string("preset", "qwen3.5-0.8b", "Tower preset "
                              "(qwen_jax.vision.VISION_PRESETS).")
_IMAGE_SIZE = flags.DEFINE_integer(
    "image_size", 224, "Side of each square image, pixels (a multiple of "
    "patch_size * spatial_merge_size).")
_IMAGES = flags.DEFINE_integer("images", 4, "Images per call.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls (median).")
_HF = flags.DEFINE_bool("hf", True, "Also run transformers' tower (torch).")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Write results here.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of weights and pixels.")


def _median_s(fn: Callable[[], Any], repeats: int) -> float:
  """Median wall time of fn() after one untimed (compiling) call."""
  times = []
  for i in range(repeats + 1):
    t0 = time.perf_counter()
    fn()
    if i:
      times.append(time.perf_counter() - t0)
  return statistics.median(times)


def random_tower(vcfg: vision.VisionConfig, seed: int) -> dict:
  """Tower parameters N(0, 0.02) (LayerNorm scales 1), built on the host."""
  rng = np.random.default_rng(seed)

  def draw(path, s):
    if path[-1].key == "scale":
      return np.ones(s.shape, np.float32)
    return (0.02 * rng.standard_normal(s.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, vision.param_shapes(vcfg))


def check_flags() -> dict[str, Any]:
  """The settings of the run, every one checked.

  Raises:
    cli.UserError: an unknown preset, a size that is not a multiple of
      patch_size * spatial_merge_size, a count out of range, an unwritable
      --json_out, or --hf without torch and transformers.
  """
  v = dict(images=cli.positive_int("--images", _IMAGES.value),
           repeats=cli.positive_int("--repeats", _REPEATS.value),
           size=cli.positive_int("--image_size", _IMAGE_SIZE.value))
  with cli.user_errors("--preset"):
    v["vcfg"] = vision.VisionConfig.from_preset(_PRESET.value)
  factor = v["vcfg"].patch_size * v["vcfg"].spatial_merge_size
  if v["size"] % factor:
    raise cli.UserError(f"--image_size: expected a multiple of patch_size "
                        f"* spatial_merge_size = {factor}, found {v['size']}")
  cli.benchmark_outputs(_JSON_OUT.value, _HF.value)
  return v


def bench_hf(vcfg, params, pixels, grid, repeats) -> tuple[float, np.ndarray]:
  """(seconds per call, merged features) of transformers' tower."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  d = vcfg.to_hf_dict()
  d.pop("model_type")
  model = transformers.Qwen3_5VisionModel(
      transformers.Qwen3_5VisionConfig(**d)).float().eval()
  state = {k[len(vision.VISION_PREFIX):]: torch.from_numpy(v)
           for k, v in vision.params_to_hf(vcfg, params).items()}
  model.load_state_dict(state)
  x, g = torch.from_numpy(pixels), torch.from_numpy(grid)

  def call():
    with torch.no_grad():
      return model(x, grid_thw=g).pooler_output

  sec = _median_s(call, repeats)
  return sec, call().numpy()


def main(argv):
  del argv  # cli.run refuses positional arguments
  v = check_flags()
  vcfg, n, size, repeats = v["vcfg"], v["images"], v["size"], v["repeats"]
  side = size // vcfg.patch_size
  grid = np.array([[1, side, side]] * n, np.int64)
  rng = np.random.default_rng(_SEED.value)
  pixels = rng.standard_normal((n * side * side, vcfg.patch_dim)).astype(
      np.float32)
  params = random_tower(vcfg, _SEED.value)
  dev = jax.devices()[0]
  print(f"tower {_PRESET.value} ({vcfg.num_params():,} parameters), "
        f"float32, {n} images of {size} x {size} ({side * side} patches, "
        f"{side * side // vcfg.merge_unit} tokens each) per call, "
        f"{dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}")
  placed = jax.device_put(pixels)
  ours_s = _median_s(lambda: jax.block_until_ready(
      vision.encode(vcfg, params, placed, grid)), repeats)
  ours_out = np.asarray(vision.encode(vcfg, params, placed, grid))
  row = dict(workload=f"{_PRESET.value} tower, {n} x {size}px",
             value=n / ours_s, unit="images/s", seconds=ours_s,
             hf=None, ratio=None, max_rel_diff=None)
  if _HF.value:
    import torch  # pylint: disable=g-import-not-at-top
    hf_s, hf_out = bench_hf(vcfg, params, pixels, grid, repeats)
    row.update(hf=n / hf_s, ratio=hf_s / ours_s,
               max_rel_diff=float(np.abs(ours_out - hf_out).max() /
                                  np.abs(hf_out).max()),
               torch_threads=torch.get_num_threads())
  print("| workload | qwen_jax | transformers | ratio | unit | max rel "
        "diff |\n| --- | --- | --- | --- | --- | --- |")
  def fmt(x, spec):
    return "—" if x is None else format(x, spec)

  print(f"| {row['workload']} | {row['value']:.3f} | {fmt(row['hf'], '.3f')}"
        f" | {fmt(row['ratio'], '.2f')}x | images/s | "
        f"{fmt(row['max_rel_diff'], '.1e')} |")
  if _JSON_OUT.value:
    meta = dict(preset=_PRESET.value, image_size=size, images=n,
                repeats=repeats, device=dev.device_kind,
                backend=jax.default_backend(), jax=jax.__version__,
                python=platform.python_version(),
                date=datetime.datetime.now().isoformat(timespec="seconds"))
    if _HF.value:
      import torch  # pylint: disable=g-import-not-at-top
      import transformers  # pylint: disable=g-import-not-at-top
      meta.update(torch=torch.__version__,
                  transformers=transformers.__version__)
    with open(_JSON_OUT.value, "w") as f:
      json.dump(dict(meta=meta, rows=[row]), f, indent=2)
    print(f"wrote {_JSON_OUT.value}")


if __name__ == "__main__":
  cli.run(main)
