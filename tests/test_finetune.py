"""End-to-end fine-tuning runs of experiments/train.py's finetune config.

A tiny random checkpoint with a tiny trained tokenizer
(`tests/finetune_utils.py`) is adapted to a few chat conversations:

  * full fine-tuning: the loss falls; the workdir holds metrics.csv, the
    held-out evaluations with samples, loss.png and TensorBoard event files
    whose train/loss scalars are metrics.csv's losses;
  * LoRA: a run killed after its checkpoint in the middle of an epoch and
    run again resumes there and reproduces the uninterrupted run's losses
    bit for bit; its adapter and merged export are written;
  * full fine-tuning on a mesh of 4 CPU devices (fsdp:2, seq:2; a
    subprocess): the same training and held-out losses as on one device,
    and a sample generated with the sharded weights;
  * a checkpoint with a vision tower: LoRA on its language model, the
    export multimodal with the tower's tensors unchanged;
  * a mixture-of-experts checkpoint: full fine-tuning trains its experts
    and writes the routing to metrics.csv and TensorBoard, LoRA leaves the
    experts as they were, and the experts split over an expert axis
    (all-to-all dispatch, a subprocess on 4 CPU devices) give one device's
    losses; experts' choices that cannot apply are one line.
"""

import csv
import glob
import json
import math
import os
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from experiments import finetune
from experiments import train as train_script
from experiments.configs import finetune as finetune_config
from qwen_jax import finetune_data
from qwen_jax import train_workdir
from tests import finetune_utils as fu
from tests.tolerances import assert_close

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  base = tmp_path_factory.mktemp("ft_e2e")
  ckpt, _ = fu.tiny_checkpoint(str(base / "ckpt"), fu.THINKING)
  chats = fu.write_chats(str(base / "chats.jsonl"), copies=6)
  return ckpt, chats


def _config(ckpt, chats, **train):
  config = finetune_config.get_config()
  config.init_checkpoint = ckpt
  config.data.path = chats
  config.data.eval_fraction = 0.15
  config.model.remat_policy = "none"
  config.eval.samples = 2
  config.eval.max_new_tokens = 6
  config.eval.num_batches = 2
  t = dict(seq_len=96, batch_size=2, num_steps=12, warmup_steps=2,
           log_every=1, checkpoint_every=0, learning_rate=3e-3)
  t.update(train)
  for k, v in t.items():
    config.train[k] = v
  return config


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.csv")) as f:
    return list(csv.DictReader(f))


def _tb_scalars(folder):
  """{tag: {step: value}} of the event files (TFRecord framing)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  out = {}
  for path in sorted(glob.glob(os.path.join(folder, "events.out.*"))):
    with open(path, "rb") as f:
      data = f.read()
    pos = 0
    while pos < len(data):
      (n,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
      pos += 12 + n + 4
      for v in event.summary.value:
        if v.HasField("simple_value"):
          out.setdefault(v.tag, {})[event.step] = v.simple_value
  return out


def test_full_finetuning_loss_falls_and_writes_its_files(files, tmp_path):
  ckpt, chats = files
  workdir = str(tmp_path / "full")
  config = _config(ckpt, chats, num_steps=16)
  config.eval_every = 8
  summary = train_script.run(config, workdir, progress=False)
  rows = _metrics(workdir)
  losses = [float(r["loss"]) for r in rows]
  assert len(losses) == 16
  assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 1.0, losses
  assert summary["mode"] == "full"
  evals = sorted(os.listdir(os.path.join(workdir, "evals")))
  assert evals == ["step_000008.json", "step_000016.json"]
  with open(os.path.join(workdir, "evals", evals[-1])) as f:
    last = json.load(f)
  assert last["loss"] < json.load(open(os.path.join(
      workdir, "evals", evals[0])))["loss"]
  assert last["perplexity"] == math.exp(last["loss"])
  assert len(last["samples"]) == 2
  assert last["samples"][0]["prompt"].endswith("<|im_start|>assistant\n")
  assert last["samples"][0]["reference"].startswith("<think>")
  with open(os.path.join(workdir, "loss.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  tb = _tb_scalars(os.path.join(workdir, "tensorboard"))
  # Event files hold float32 scalars: the same numbers, rounded once.
  for r in rows:
    assert tb["train/loss"][int(r["step"])] == np.float32(float(r["loss"]))
  assert tb["eval/loss"][16] == np.float32(last["loss"])
  assert summary["eval"]["loss"] == last["loss"]
  print(finetune.format_summary(summary))


class _Crash(Exception):
  pass


def test_lora_resume_mid_epoch_reproduces_the_losses(files, tmp_path,
                                                     monkeypatch):
  ckpt, chats = files
  config = _config(ckpt, chats, checkpoint_every=4, num_steps=10)
  config.lora_rank = 4
  config.base_dtype = "float32"
  config.eval.samples = 0
  config.eval_every = 0
  full = str(tmp_path / "uninterrupted")
  train_script.run(config, full, progress=False)

  # The checkpoint at step 4 lies inside an epoch.
  tok = finetune.tokenizer_lib.load_tokenizer(ckpt)
  corpus = finetune_data.prepare_corpus(
      chats, tok, str(tmp_path / "cache"),
      finetune_data.DataOptions(eval_fraction=0.15))
  packed = finetune_data.PackedData(corpus, 96, 2)
  epoch, row = packed.locate(4 * 2)
  assert row > 0, (epoch, row)

  original = finetune.train_lib.train

  def crashing(*args, **kwargs):
    callback = kwargs["callback"]

    def crash_after_6(step, metrics):
      callback(step, metrics)
      if step == 5:  # the update to 6 steps, after the save at 4
        raise _Crash()
    kwargs["callback"] = crash_after_6
    return original(*args, **kwargs)

  resumed = str(tmp_path / "resumed")
  monkeypatch.setattr(finetune.train_lib, "train", crashing)
  with pytest.raises(_Crash):
    train_script.run(config, resumed, progress=False,
                     export_hf=str(tmp_path / "export"))
  monkeypatch.setattr(finetune.train_lib, "train", original)
  summary = train_script.run(config, resumed, progress=False,
                             export_hf=str(tmp_path / "export"))
  assert summary["train"]["resumed_from"] == 4
  want = [(r["step"], r["loss"]) for r in _metrics(full)]
  got = [(r["step"], r["loss"]) for r in _metrics(resumed)]
  assert got == want  # the same float32 values, written the same way
  assert os.path.isfile(os.path.join(resumed, "adapter",
                                     "adapter_model.safetensors"))
  assert summary["model"]["trained_params"] < summary["model"]["params"] / 5
  assert os.path.isfile(os.path.join(tmp_path, "export", "tokenizer.json"))
  assert os.path.isfile(os.path.join(tmp_path, "export", "model.safetensors"))


def test_multimodal_checkpoint_keeps_its_tower(tmp_path):
  """A checkpoint with a vision tower (the released layout): LoRA on its
  language model; the merged export is multimodal again with the tower's
  tensors as they were, and the adapter names the language model's
  modules."""
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  ckpt, _ = fu.tiny_checkpoint(str(tmp_path / "vl"), fu.CHATML, vision=True)
  chats = fu.write_chats(str(tmp_path / "chats.jsonl"), copies=2)
  config = _config(ckpt, chats, num_steps=1, log_every=1)
  config.lora_rank = 2
  config.base_dtype = "float32"
  config.data.eval_fraction = 0.0
  config.eval.samples = 0
  out = str(tmp_path / "export")
  summary = train_script.run(config, str(tmp_path / "w"), progress=False,
                             export_hf=out)
  assert summary["step"] == 1
  with open(os.path.join(out, "config.json")) as f:
    assert "vision_config" in json.load(f)
  before = safetensors.numpy.load_file(
      os.path.join(ckpt, "model.safetensors"))
  after = safetensors.numpy.load_file(os.path.join(out, "model.safetensors"))
  visual = [k for k in before if k.startswith("model.visual.")]
  assert visual and set(before) == set(after)
  for k in visual:
    np.testing.assert_array_equal(after[k], before[k])
  changed = [k for k in before if not np.array_equal(after[k], before[k])]
  assert changed and all(k.startswith("model.language_model.layers.")
                         for k in changed), changed
  adapter = safetensors.numpy.load_file(
      os.path.join(tmp_path, "w", "adapter", "adapter_model.safetensors"))
  names = {k[len("base_model.model."):-len(".lora_A.weight")] + ".weight"
           for k in adapter if k.endswith(".lora_A.weight")}
  assert names == set(changed)


_MESH_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    from experiments import train as train_script
    from tests import test_finetune as t
    ckpt, chats, out = sys.argv[1:4]
    assert jax.device_count() == 4, jax.devices()
    results = {}
    for mesh in ("", "fsdp:2,seq:2"):  # full fine-tuning
      config = t._config(ckpt, chats, num_steps=4)
      config.mesh = mesh
      # Held-out loss on both; a sample on the mesh (generation with
      # sharded weights).
      config.eval.samples = 1 if mesh else 0
      config.eval.max_new_tokens = 3
      workdir = f"{out}/w_{mesh.replace(':', '').replace(',', '')}"
      summary = train_script.run(config, workdir, progress=False)
      results[mesh] = {
          "train": [float(r["loss"]) for r in t._metrics(workdir)],
          "eval": summary["eval"]["loss"],
          "samples": len(summary["eval"]["samples"])}
    print(json.dumps(results))
""")


def _on_four_devices(script, ckpt, chats, tmp_path):
  """The JSON a script prints last, run in a subprocess with 4 CPU
  devices."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  out = subprocess.run(
      [sys.executable, "-c", script, ckpt, chats, str(tmp_path)],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
      check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_mesh_matches_one_device(files, tmp_path):
  results = _on_four_devices(_MESH_SCRIPT, *files, tmp_path)
  one, mesh = results[""], results["fsdp:2,seq:2"]
  assert len(one["train"]) == 4
  assert_close(mesh["train"], one["train"], "float32")
  assert_close(mesh["eval"], one["eval"], "float32")
  assert mesh["samples"] == 1


@pytest.mark.parametrize("field,value", [
    ("learning_rate", 0.0), ("learning_rate", float("nan")),
    ("bogus_rate", 1.0), ("grad_clip", -1.0)])
def test_bad_train_settings_are_named_before_anything_is_written(
    files, tmp_path, field, value):
  """The `train` part is checked as the training script checks it."""
  ckpt, chats = files
  config = _config(ckpt, chats)
  with config.ignore_type():
    config.train[field] = value
  workdir = str(tmp_path / "never")
  with pytest.raises(ValueError, match=rf"config\.train.*{field}") as e:
    train_script.run(config, workdir, progress=False)
  assert len(str(e.value).splitlines()) == 1
  assert not os.path.exists(workdir)


@pytest.fixture(scope="module")
def moe_files(tmp_path_factory):
  base = tmp_path_factory.mktemp("ft_moe")
  ckpt, _ = fu.tiny_checkpoint(str(base / "ckpt"), fu.THINKING, moe=True)
  chats = fu.write_chats(str(base / "chats.jsonl"), copies=6)
  return ckpt, chats


def test_mixture_of_experts_checkpoint_fine_tunes(moe_files, tmp_path):
  """Full fine-tuning of a Qwen3_5MoeForCausalLM folder with a
  load-balancing weight set in config.model: the loss falls, metrics.csv
  and TensorBoard carry the routing, the experts' fused tensors train and
  the export is a mixture-of-experts checkpoint again."""
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  ckpt, chats = moe_files
  config = _config(ckpt, chats, num_steps=12)
  config.model.router_aux_loss_coef = 0.01
  workdir, out = str(tmp_path / "w"), str(tmp_path / "hf")
  train_script.run(config, workdir, progress=False, export_hf=out)
  with open(os.path.join(workdir, "metrics.csv")) as f:
    assert next(csv.reader(f)) == list(train_workdir.metrics_fields(True))
  rows = _metrics(workdir)
  losses = [float(r["loss"]) for r in rows]
  assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.5, losses
  k, experts = 2, 8  # tiny-moe's routing
  tb = _tb_scalars(os.path.join(workdir, "tensorboard"))
  for r in rows:
    aux = float(r["router_aux_loss"])
    assert 0.0 < aux <= experts, r
    assert 0.0 <= float(r["expert_load_min"]) <= 1.0, r
    assert 1.0 <= float(r["expert_load_max"]) <= experts / k, r
    assert float(r["expert_dropped_share"]) == 0.0, r  # dropless
    assert tb["train/router_aux_loss"][int(r["step"])] == np.float32(aux)
  with open(os.path.join(workdir, "run_history.json")) as f:
    model = json.load(f)["entries"][-1]["config"]["model"]
  assert model["router_aux_loss_coef"] == 0.01
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f)["architectures"] == ["Qwen3_5MoeForCausalLM"]
  before = safetensors.numpy.load_file(
      os.path.join(ckpt, "model.safetensors"))
  after = safetensors.numpy.load_file(os.path.join(out, "model.safetensors"))
  assert set(before) == set(after)
  fused = [n for n in before if n.endswith(("experts.gate_up_proj",
                                            "experts.down_proj"))]
  assert len(fused) == 8
  for n in fused:
    assert not np.array_equal(before[n], after[n]), n


def test_lora_on_a_mixture_of_experts_checkpoint(moe_files, tmp_path):
  """LoRA's default targets on a mixture-of-experts model: the attention
  and DeltaNet projections; the merged export leaves the experts, router
  and shared expert as they were."""
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  ckpt, chats = moe_files
  config = _config(ckpt, chats, num_steps=2)
  config.lora_rank = 2
  config.base_dtype = "float32"
  config.eval.samples = 0
  out = str(tmp_path / "hf")
  train_script.run(config, str(tmp_path / "w"), progress=False,
                   export_hf=out)
  before = safetensors.numpy.load_file(
      os.path.join(ckpt, "model.safetensors"))
  after = safetensors.numpy.load_file(os.path.join(out, "model.safetensors"))
  changed = {n for n in before if not np.array_equal(before[n], after[n])}
  assert changed and all(("self_attn." in n or "linear_attn." in n)
                         for n in changed), sorted(changed)
  assert not any(".mlp." in n for n in changed)


_MOE_MESH_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    from experiments import train as train_script
    from tests import test_finetune as t
    ckpt, chats, out = sys.argv[1:4]
    results = {}
    for mesh, dispatch in (("", "gather"), ("expert:2,seq:2", "all_to_all")):
      config = t._config(ckpt, chats, num_steps=3)
      config.mesh = mesh
      config.model.moe_dispatch = dispatch
      config.model.router_aux_loss_coef = 0.01
      config.eval.samples = 0
      workdir = f"{out}/w_{dispatch}"
      summary = train_script.run(config, workdir, progress=False)
      rows = t._metrics(workdir)
      results[dispatch] = {
          "train": [float(r["loss"]) for r in rows],
          "aux": [float(r["router_aux_loss"]) for r in rows],
          "eval": summary["eval"]["loss"]}
    print(json.dumps(results))
""")


def test_mixture_of_experts_on_an_expert_axis_matches_one_device(
    moe_files, tmp_path):
  """Full fine-tuning of the mixture-of-experts checkpoint with its experts
  split over an expert axis and reached by all-to-alls (4 CPU devices,
  expert:2, seq:2): one device's losses, routing and held-out loss."""
  results = _on_four_devices(_MOE_MESH_SCRIPT, *moe_files, tmp_path)
  one, mesh = results["gather"], results["all_to_all"]
  assert len(one["train"]) == 3
  for key in ("train", "aux", "eval"):
    assert_close(mesh[key], one[key], "float32")


@pytest.mark.parametrize("field,value,checkpoint,says", [
    ("moe_dispatch", "gather", "dense", "mixture-of-experts"),
    ("router_aux_loss_coef", 0.01, "dense", "mixture-of-experts"),
    ("moe_dispatch", "all_to_all", "moe", "config.mesh"),
    ("moe_capacity_factor", 1.5, "moe", "moe_capacity_factor"),
])
def test_mixture_of_experts_choices_that_cannot_apply_are_one_line(
    files, moe_files, tmp_path, field, value, checkpoint, says):
  """config.model's experts' choices on a dense checkpoint, the all-to-all
  without an expert axis, a capacity without the all-to-all: one line
  naming the field, before anything is written."""
  ckpt, chats = moe_files if checkpoint == "moe" else files
  config = _config(ckpt, chats)
  config.model[field] = value
  workdir = str(tmp_path / "never")
  with pytest.raises(ValueError, match=field) as e:
    train_script.run(config, workdir, progress=False)
  assert says in str(e.value)
  assert len(str(e.value).splitlines()) == 1
  assert not os.path.exists(workdir)
