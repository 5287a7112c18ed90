"""A save into a folder never loses what the folder holds; bad weights refused.

  * a save that fails partway (a disk that fills up, injected into the
    checkpoint module's file writes) or is killed with SIGKILL partway
    leaves the checkpoint that was there byte for byte, loadable with its
    parameters;
  * a multimodal checkpoint (transformers' `Qwen3_5ForConditionalGeneration`
    with fake `mtp.*` tensors) loaded in bfloat16 and saved into its own
    folder keeps `mtp.*` (bit-equal, in float32), its wrapper config
    (vision_config, token ids, every other entry) and every other file,
    and writes its own `model.visual.*` tower in bf16 beside the text
    weights; transformers loads it as the same model with bf16 weights;
    sharded <-> single file both ways;
  * what cannot be kept (a folder whose checkpoint cannot be read, parts of
    another model, a file in the way) is refused by name before anything is
    written;
  * shards are filled up to the size limit, no more, no less.
"""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import chex
import jax
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers

import qwen_jax
from qwen_jax import checkpoint
from qwen_jax.config import FULL, LINEAR
from tests import hf_utils
from tests import tolerances

L, F = LINEAR, FULL
_TEXT = dict(layer_types=[L, L, L, F])
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _snapshot(path):
  """{relative path: (bytes, mtime_ns)} of every file under `path`, but for
  hidden folders (where a save stages its files)."""
  out = {}
  for root, dirs, files in os.walk(path):
    dirs[:] = [d for d in dirs if not d.startswith(".")]
    for f in files:
      full = os.path.join(root, f)
      with open(full, "rb") as fh:
        out[os.path.relpath(full, path)] = (fh.read(),
                                            os.stat(full).st_mtime_ns)
  return out


def _visible(path):
  return sorted(f for f in os.listdir(path) if not f.startswith("."))


def _staging(path):
  return [f for f in os.listdir(path)
          if f.startswith(checkpoint.STAGING_PREFIX)]


def _add_user_files(path):
  """Files a user keeps beside the weights (the library must not touch)."""
  (path / "README.md").write_text("my notes")
  (path / "tokenizer.json").write_text('{"model": {}}')
  (path / "weights_backup.bin").write_bytes(os.urandom(64))
  (path / "notes").mkdir()
  (path / "notes" / "run.txt").write_text("lr 1e-4")


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
  """(folder, torch model): a tiny multimodal checkpoint with fake mtp.*."""
  cfg = hf_utils.make_text_config(**_TEXT)
  return hf_utils.save_conditional_generation(
      tmp_path_factory.mktemp("vlm"), cfg, 21)


@pytest.fixture(scope="module")
def vlm_sharded(tmp_path_factory):
  """The same kind of checkpoint in shards (mtp.* in the first one)."""
  cfg = hf_utils.make_text_config(**_TEXT)
  wrapper = transformers.Qwen3_5Config(
      text_config=cfg.to_dict(),
      vision_config=hf_utils.make_vision_config().to_dict())
  torch.manual_seed(22)
  model = transformers.Qwen3_5ForConditionalGeneration(wrapper).float()
  hf_utils.randomize_(model, 22)
  path = tmp_path_factory.mktemp("vlm_sharded") / "ckpt"
  model.save_pretrained(path, max_shard_size="100KB")
  hf_utils.add_fake_mtp(path, 22)
  assert os.path.exists(path / checkpoint.INDEX_FILE)
  return str(path), model.eval()


@pytest.fixture(scope="module")
def text_ckpt(tmp_path_factory):
  cfg = hf_utils.make_text_config(**_TEXT)
  return hf_utils.save_causal_lm(tmp_path_factory.mktemp("text"), cfg, 23)[0]


def _copy(src, tmp_path, name="ckpt"):
  dst = tmp_path / name
  shutil.copytree(src, dst)
  return dst


# ------------------------------------------------- interrupted writes
class _FullDisk:
  """A file whose writes fail with ENOSPC once `budget` bytes are written."""

  def __init__(self, f, budget):
    self._f, self._budget = f, budget

  def write(self, data):
    n = len(memoryview(data).cast("B")) if not isinstance(data, str) else (
        len(data))
    if n > self._budget[0]:
      part = self._budget[0]
      self._f.write(data[:part] if isinstance(data, str)
                    else memoryview(data).cast("B")[:part])
      self._budget[0] = 0
      raise OSError(errno.ENOSPC, "No space left on device (injected)")
    self._budget[0] -= n
    return self._f.write(data)

  def __getattr__(self, name):
    return getattr(self._f, name)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self._f.close()


def _full_disk_after(monkeypatch, nbytes):
  """checkpoint.py's open(): writes fail after `nbytes` in all, as a disk
  that fills up would (the module's own writes, whatever their order)."""
  budget = [nbytes]
  real = open

  def fake_open(file, mode="r", *args, **kw):
    f = real(file, mode, *args, **kw)
    return _FullDisk(f, budget) if any(c in mode for c in "wax") else f

  monkeypatch.setattr(checkpoint, "open", fake_open, raising=False)


@pytest.mark.parametrize("shards", [None, 60_000])
def test_failed_save_leaves_the_old_checkpoint(text_ckpt, tmp_path,
                                               monkeypatch, shards):
  dst = _copy(text_ckpt, tmp_path)
  cfg, params = qwen_jax.load_hf_checkpoint(dst)
  kw = {} if shards is None else {"max_shard_bytes": shards}
  qwen_jax.save_hf_checkpoint(dst, cfg, params, **kw)  # ours, then fail
  before = _snapshot(dst)
  total = sum(len(b) for n, (b, _) in before.items()
              if n.endswith(".safetensors"))
  _full_disk_after(monkeypatch, total // 2)
  other = jax.tree_util.tree_map(lambda x: x * 2, params)
  with pytest.raises(OSError, match="No space left"):
    qwen_jax.save_hf_checkpoint(dst, cfg, other, **kw)
  monkeypatch.undo()
  assert _snapshot(dst) == before  # every byte, no half-written file
  assert _staging(dst) == []  # the partial files went with their folder
  chex.assert_trees_all_equal(qwen_jax.load_hf_checkpoint(dst)[1], params)


_KILLED_SAVE = textwrap.dedent("""
    import sys, time
    import jax
    import qwen_jax
    from qwen_jax import checkpoint
    path, marker, budget = sys.argv[1], sys.argv[2], int(sys.argv[3])
    cfg, params = qwen_jax.load_hf_checkpoint(path)
    params = jax.tree_util.tree_map(lambda x: x * 2, params)
    real, left = open, [budget]

    class Slow:
      # Writes go through; past the budget the writer stops for good, and
      # says so (the test then kills this process with SIGKILL).
      def __init__(self, f):
        self.f = f
      def write(self, data):
        left[0] -= len(memoryview(data).cast("B"))
        n = self.f.write(data)
        if left[0] < 0:
          self.f.flush()
          open(marker, "w").close()
          time.sleep(600)
        return n
      def __getattr__(self, name):
        return getattr(self.f, name)
      def __enter__(self):
        return self
      def __exit__(self, *exc):
        self.f.close()

    def slow_open(file, mode="r", *a, **kw):
      f = real(file, mode, *a, **kw)
      return Slow(f) if "b" in mode and "w" in mode else f

    checkpoint.open = slow_open
    qwen_jax.save_hf_checkpoint(path, cfg, params, dtype="bfloat16")
    """)


def test_save_killed_midway_leaves_the_old_checkpoint(vlm, tmp_path):
  dst = _copy(vlm[0], tmp_path)
  _add_user_files(dst)
  cfg, params = qwen_jax.load_hf_checkpoint(dst)
  before = _snapshot(dst)
  size = os.path.getsize(dst / checkpoint.SINGLE_FILE)
  marker = tmp_path / "writing"
  proc = subprocess.Popen(
      [sys.executable, "-c", _KILLED_SAVE, str(dst), str(marker),
       str(size // 3)], cwd=_REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"),
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  try:
    deadline = time.monotonic() + 120
    while not marker.exists():
      assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
      assert time.monotonic() < deadline, "the save never started writing"
      time.sleep(0.1)
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  assert _snapshot(dst) == before  # the old files, every byte
  # What the killed save left is only its hidden folder.
  staged = _staging(dst)
  assert len(staged) == 1 and os.listdir(dst / staged[0])
  chex.assert_trees_all_equal(qwen_jax.load_hf_checkpoint(dst)[1], params)
  # Another save goes through beside the leftover, and leaves it alone.
  leftover = _snapshot(dst / staged[0])
  qwen_jax.save_hf_checkpoint(dst, cfg, params, dtype="bfloat16")
  assert _staging(dst) == staged
  assert _snapshot(dst / staged[0]) == leftover
  assert hf_utils.read_config(dst)["dtype"] == "bfloat16"
  chex.assert_trees_all_equal(
      qwen_jax.load_hf_checkpoint(dst, dtype="bfloat16")[1],
      jax.tree_util.tree_map(lambda x: x.astype("bfloat16"), params))


# ------------------------------------------ bf16 in place, multimodal
def _reference_logits(model, ids):
  """The torch model with its weights rounded to bf16 (mtp.* is not one of
  them)."""
  import copy  # pylint: disable=g-import-not-at-top
  ref = copy.deepcopy(model)
  with torch.no_grad():
    for _, p in ref.named_parameters():
      p.copy_(p.to(torch.bfloat16).float())
  with torch.no_grad():
    out = ref(input_ids=torch.as_tensor(ids, dtype=torch.long),
              use_cache=False)
  return out.logits.float().numpy()


def test_bf16_in_place_keeps_the_multimodal_checkpoint(vlm, tmp_path):
  dst = _copy(vlm[0], tmp_path)
  _add_user_files(dst)
  orig_tensors = hf_utils.read_tensors(dst)
  orig_config = hf_utils.read_config(dst)
  user = {k: v for k, v in _snapshot(dst).items()
          if k not in ("config.json", checkpoint.SINGLE_FILE)}
  assert "generation_config.json" in user
  names = _visible(dst)

  cfg, params = qwen_jax.load_hf_checkpoint(dst, dtype="bfloat16")
  qwen_jax.save_hf_checkpoint(dst, cfg, params)

  assert _visible(dst) == names and _staging(dst) == []
  for k, v in user.items():  # every other file: same bytes, not rewritten
    assert _snapshot(dst)[k] == v, k
  new = hf_utils.read_tensors(dst)
  assert sorted(new) == sorted(orig_tensors)
  foreign = [k for k in new if k.startswith("mtp.")]
  assert foreign and any(k.startswith("model.visual.") for k in new)
  for k, v in orig_tensors.items():
    if k in foreign:  # carried: original dtype, bit for bit
      assert new[k].dtype == v.dtype == np.float32, k
      np.testing.assert_array_equal(new[k], v, err_msg=k)
    else:  # ours (the tower too): converted
      assert new[k].dtype == ml_dtypes.bfloat16, k
      np.testing.assert_array_equal(new[k], v.astype(ml_dtypes.bfloat16),
                                    err_msg=k)
  # The wrapper config: every entry kept, only what we own updated.
  config = hf_utils.read_config(dst)
  assert sorted(config) == sorted(orig_config)
  for k, v in orig_config.items():
    if k not in ("text_config", "vision_config", "dtype"):
      assert config[k] == v, k
  assert config["dtype"] == "bfloat16"
  for part in ("text_config", "vision_config"):
    assert sorted(config[part]) == sorted(orig_config[part]), part
    for k, v in orig_config[part].items():
      if k != "dtype":
        assert config[part][k] == v, (part, k)
  # transformers loads the same multimodal model, text weights in bf16.
  model, info = transformers.Qwen3_5ForConditionalGeneration.from_pretrained(
      dst, dtype=torch.float32, output_loading_info=True)
  assert not info["missing_keys"]
  assert all(k.startswith("mtp.") for k in info["unexpected_keys"])
  theirs = model.state_dict()
  for k, v in orig_tensors.items():
    if k.startswith("model.visual."):
      np.testing.assert_array_equal(
          theirs[k].numpy(), v.astype(ml_dtypes.bfloat16).astype(np.float32))
  ids = hf_utils.random_ids(np.random.default_rng(3), 2, 19, 128)
  got = hf_utils.hf_logits(model.eval(), ids)
  ref = _reference_logits(vlm[1], ids)
  assert tolerances.max_rel_err(got, ref) < tolerances.HF_LOGITS_REL
  # And we load it back: the bf16 parameters we saved.
  back_cfg, back = qwen_jax.load_hf_checkpoint(dst, dtype="bfloat16")
  assert back_cfg == cfg
  chex.assert_trees_all_equal(back, params)


@pytest.mark.parametrize("direction", ["shards_to_single", "single_to_shards"])
def test_in_place_between_shards_and_single_file(vlm, vlm_sharded, tmp_path,
                                                 direction):
  src = vlm_sharded[0] if direction == "shards_to_single" else vlm[0]
  dst = _copy(src, tmp_path)
  _add_user_files(dst)
  orig = hf_utils.read_tensors(dst)
  old_files = hf_utils.safetensors_files(dst)
  cfg, params = qwen_jax.load_hf_checkpoint(dst)
  kw = ({} if direction == "shards_to_single"
        else {"max_shard_bytes": 60_000})
  qwen_jax.save_hf_checkpoint(dst, cfg, params, **kw)
  files = hf_utils.safetensors_files(dst)
  if direction == "shards_to_single":
    assert files == [checkpoint.SINGLE_FILE]  # the old shards went
    assert not os.path.exists(dst / checkpoint.INDEX_FILE)
  else:
    assert checkpoint.SINGLE_FILE not in files and len(files) > 2
    with open(dst / checkpoint.INDEX_FILE) as f:
      wmap = json.load(f)["weight_map"]
    assert sorted(wmap) == sorted(orig) and set(wmap.values()) == set(files)
  assert old_files != files
  new = hf_utils.read_tensors(dst)
  assert sorted(new) == sorted(orig)
  for k, v in orig.items():
    np.testing.assert_array_equal(new[k], v, err_msg=k)
  assert (dst / "README.md").read_text() == "my notes"
  assert (dst / "notes" / "run.txt").read_text() == "lr 1e-4"
  chex.assert_trees_all_equal(qwen_jax.load_hf_checkpoint(dst)[1], params)


def test_text_config_entries_we_do_not_own_are_kept(text_ckpt, tmp_path):
  dst = _copy(text_ckpt, tmp_path)
  hf_utils.edit_config(dst, lambda d: d.update(
      torch_dtype="float32", mtp_num_hidden_layers=1, my_field=[1, 2]))
  orig = hf_utils.read_config(dst)
  cfg, params = qwen_jax.load_hf_checkpoint(dst)
  qwen_jax.save_hf_checkpoint(dst, cfg, params, dtype="bfloat16")
  new = hf_utils.read_config(dst)
  assert sorted(new) == sorted(orig)
  assert new["dtype"] == new["torch_dtype"] == "bfloat16"
  for k, v in orig.items():
    if k not in ("dtype", "torch_dtype"):
      assert new[k] == v, k


def test_text_only_checkpoint_of_another_shape_is_replaced(text_ckpt,
                                                           tmp_path):
  dst = _copy(text_ckpt, tmp_path)
  cfg = qwen_jax.QwenConfig.from_preset("tiny")
  params = jax.tree_util.tree_map(
      lambda s: np.full(s.shape, 0.5, s.dtype), checkpoint.param_shapes(cfg))
  qwen_jax.save_hf_checkpoint(dst, cfg, params)
  back_cfg, back = qwen_jax.load_hf_checkpoint(dst)
  assert back_cfg.hidden_size == cfg.hidden_size
  chex.assert_trees_all_equal(back, params)


# ------------------------------------------------------------ refusals
def test_refuses_to_drop_parts_of_another_model(vlm, tmp_path):
  dst = _copy(vlm[0], tmp_path)
  before = _snapshot(dst)
  cfg = qwen_jax.QwenConfig.from_preset("tiny")  # vocab 256, not 128
  params = jax.tree_util.tree_map(
      lambda s: np.zeros(s.shape, s.dtype), checkpoint.param_shapes(cfg))
  with pytest.raises(ValueError, match=(
      r"holds a checkpoint of another model \(vocab_size 128 there, 256 "
      r"here\); its \d+ tensors \(model\.visual\.\*, mtp\.\*\) and the "
      r"config entries .*vision_config.* would lose them; nothing was "
      r"written")):
    qwen_jax.save_hf_checkpoint(dst, cfg, params)
  assert _snapshot(dst) == before and _staging(dst) == []


def test_refuses_when_the_checkpoint_there_cannot_be_read(vlm_sharded,
                                                          tmp_path):
  dst = _copy(vlm_sharded[0], tmp_path)
  cfg, params = qwen_jax.load_hf_checkpoint(dst)
  with open(dst / checkpoint.INDEX_FILE) as f:
    shard = sorted(set(json.load(f)["weight_map"].values()))[-1]
  raw = (dst / shard).read_bytes()
  (dst / shard).write_bytes(raw[:-100])  # truncated
  before = _snapshot(dst)
  with pytest.raises(ValueError, match=(
      r"cannot read the checkpoint in .*" + shard + r": tensor .* "
      r"\(truncated file\?\)\), so what it holds beyond this model could "
      r"not be kept; nothing was written")):
    qwen_jax.save_hf_checkpoint(dst, cfg, params)
  assert _snapshot(dst) == before and _staging(dst) == []


def test_refuses_to_overwrite_a_file_outside_the_checkpoint(text_ckpt,
                                                            tmp_path):
  dst = _copy(text_ckpt, tmp_path)
  cfg, params = qwen_jax.load_hf_checkpoint(dst)
  scratch = tmp_path / "scratch"
  qwen_jax.save_hf_checkpoint(scratch, cfg, params, max_shard_bytes=60_000)
  shard = hf_utils.safetensors_files(scratch)[0]
  (dst / shard).write_bytes(b"the user's own file")
  before = _snapshot(dst)
  with pytest.raises(ValueError, match=(
      shard + r"' is in the way of a new weight file and is not part of the "
      r"checkpoint .*nothing was written")):
    qwen_jax.save_hf_checkpoint(dst, cfg, params, max_shard_bytes=60_000)
  assert _snapshot(dst) == before and _staging(dst) == []


def test_refuses_a_file_as_the_folder(tmp_path):
  cfg = qwen_jax.QwenConfig.from_preset("tiny")
  params = jax.tree_util.tree_map(
      lambda s: np.zeros(s.shape, s.dtype), checkpoint.param_shapes(cfg))
  (tmp_path / "f").write_text("x")
  with pytest.raises(ValueError, match="path: expected a folder, found the "
                     "file"):
    qwen_jax.save_hf_checkpoint(tmp_path / "f", cfg, params)
  assert (tmp_path / "f").read_text() == "x"


# ------------------------------------------------------------ shard sizes
@pytest.mark.parametrize("limit", [60_000, 200_000])
def test_shards_are_filled_up_to_the_limit(text_ckpt, tmp_path, limit):
  """Each shard holds at most `limit` bytes of tensors (or one tensor), and
  the next shard's first tensor would not have fitted: a packing that
  splits too early or too late fails."""
  cfg, params = qwen_jax.load_hf_checkpoint(text_ckpt)
  qwen_jax.save_hf_checkpoint(tmp_path, cfg, params, max_shard_bytes=limit)
  with open(tmp_path / checkpoint.INDEX_FILE) as f:
    index = json.load(f)
  names = sorted(set(index["weight_map"].values()))
  sizes, firsts = [], []
  for name in names:
    st = checkpoint.SafetensorsFile(str(tmp_path / name))
    spans = sorted(st.header[k]["data_offsets"] for k in st.keys())
    sizes.append(spans[-1][1])
    firsts.append(spans[0][1] - spans[0][0])
  assert names == [f"model-{i + 1:05d}-of-{len(names):05d}.safetensors"
                   for i in range(len(names))]
  for i, size in enumerate(sizes):
    assert size <= limit or size == firsts[i], (i, size)
    if i + 1 < len(sizes):
      assert size + firsts[i + 1] > limit, (i, size, firsts[i + 1])
  assert index["metadata"]["total_size"] == sum(sizes)
