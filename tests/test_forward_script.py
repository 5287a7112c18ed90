"""experiments/forward.py: the random-weights default and --checkpoint."""

import os
import subprocess
import sys

from experiments import forward
from tests import hf_utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_run_forward_tiny_preset():
  cfg, params = forward.build("tiny", None, "float32", seed=0)
  r = forward.run_forward(cfg, params, batch=2, seq_len=70, seed=0,
                          repeats=1)
  assert r["logits_shape"] == (2, 70, cfg.vocab_size)
  assert r["params"] == cfg.num_params()
  assert r["finite"]


def test_script_loads_a_transformers_checkpoint(tmp_path):
  path, model = hf_utils.save_causal_lm(tmp_path, hf_utils.make_text_config(),
                                        seed=3)
  out = subprocess.run(
      [sys.executable, "-m", "experiments.forward", "--checkpoint", path,
       "--seq_len", "9", "--repeats", "1"],
      cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert out.returncode == 0, out.stderr[-2000:]
  n = sum(p.numel() for p in model.parameters())
  assert f"parameters:  {n:,}" in out.stdout
  assert "(2, 9, 128)" in out.stdout


def test_script_rejects_a_bad_folder(tmp_path):
  out = subprocess.run(
      [sys.executable, "-m", "experiments.forward", "--checkpoint",
       str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300,
      check=False)
  assert out.returncode != 0
  assert "config.json" in out.stderr
