"""Misusing an experiment script ends with one line, an exit status, no trace.

Each script runs in a subprocess (`python -m experiments.NAME ...`, cwd the
repository root, JAX_PLATFORMS=cpu) on a table of bad command lines. For
each the test asserts:

  * exactly one line on stderr, "experiments.NAME: error: ...", naming the
    flag or path (and, where it matters, what it must not blame);
  * the exit status (1 bad input, 2 usage, 130 Ctrl-C; experiments/cli.py);
  * no "Traceback" anywhere on stderr;
  * that it returned quickly: every check runs before a checkpoint is read,
    a model is built or anything is compiled (the checkpoints here have
    broken weights, so a check made after loading would report those
    instead of the flag);
  * that the files and folders in the way are untouched (same bytes, same
    mtime, no new entries), and that output folders were not created.

stderr is taken as it is, except for lines in the format of XLA's C++
logging ("W0101 12:00:00.000000  123 file.cc:45] ...", and absl's notice
that precedes them), which a platform may print when jax starts; none is
expected on a CPU with JAX_PLATFORMS=cpu. The Ctrl-C test also lets
through the training progress lines ("mqar [#...] 3/100000 ...").

Each call costs a Python start and the script's imports (jax: about 2 s),
so the tables hold one case per distinct check.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from experiments import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MQAR_LOCAL = "--config=experiments/configs/mqar.py:runlocal"
# A bad invocation must fail in a few seconds (the imports); a limit well
# under what loading or compiling takes, with room for a loaded CI machine.
QUICK_S = 30.0
# Old behaviours (running on, loading first) end here instead of hanging.
TIMEOUT_S = 120.0

_NOISE = re.compile(
    r"^([IWEF]\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+ \S+:\d+\] |WARNING: All log "
    r"messages before absl::InitializeLog\(\) is called)")


def _env() -> dict[str, str]:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["PYTHONPATH"] = os.pathsep.join(
      [ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
  return env


def _error_lines(stderr: str, extra_ok: re.Pattern | None = None
                 ) -> list[str]:
  return [s for s in stderr.splitlines()
          if s.strip() and not _NOISE.match(s)
          and not (extra_ok and extra_ok.match(s))]


def _snapshot(root: str) -> dict[str, tuple]:
  """Every entry under root: kind, size, mtime and the bytes' hash."""
  out = {}
  for d, dirs, files in os.walk(root):
    st = os.stat(d)
    out[d] = ("dir", st.st_mtime_ns, tuple(sorted(dirs + files)))
    for f in files:
      p = os.path.join(d, f)
      st = os.stat(p)
      with open(p, "rb") as fh:
        digest = hashlib.sha256(fh.read()).hexdigest()
      out[p] = ("file", st.st_size, st.st_mtime_ns, digest)
  return out


@dataclasses.dataclass
class Case:
  """A bad command line and what its one error line must say."""
  args: list[str]
  names: list[str]  # substrings of the error line
  status: int = 1
  not_created: list[str] = dataclasses.field(default_factory=list)
  not_prefix: str | None = None  # the message must not start with this


def _check_cases(script: str, cases: list[Case], way: str) -> None:
  """Runs each case; collects every failure, then fails with all of them."""
  before = _snapshot(way)
  problems = []
  for case in cases:
    t0 = time.monotonic()
    try:
      proc = subprocess.run(
          [sys.executable, "-m", f"experiments.{script}", *case.args],
          cwd=ROOT, env=_env(), capture_output=True, text=True,
          timeout=TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
      problems.append(f"{case.args}: still running after {TIMEOUT_S} s")
      continue
    took = time.monotonic() - t0
    lines = _error_lines(proc.stderr)
    prefix = f"experiments.{script}: error: "
    why = []
    if proc.returncode != case.status:
      why.append(f"exit status {proc.returncode}, expected {case.status}")
    if "Traceback" in proc.stderr:
      why.append("a traceback")
    if len(lines) != 1 or not lines[0].startswith(prefix):
      why.append(f"{len(lines)} stderr lines, expected one "
                 f"starting {prefix!r}")
    else:
      missing = [n for n in case.names if n not in lines[0]]
      if missing:
        why.append(f"the line does not name {missing}")
      if case.not_prefix and lines[0][len(prefix):].startswith(
          case.not_prefix):
        why.append(f"the line blames {case.not_prefix}")
    if took > QUICK_S:
      why.append(f"took {took:.0f} s")
    created = [p for p in case.not_created if os.path.lexists(p)]
    if created:
      why.append(f"created {created}")
    after = _snapshot(way)
    if after != before:
      changed = sorted(set(before.items()) ^ set(after.items()))
      why.append(f"changed {[c[0] for c in changed]}")
      before = after
    if why:
      problems.append(f"{case.args}: {'; '.join(why)}\n    stderr: "
                      f"{proc.stderr[-600:]!r}")
  assert not problems, "\n".join(problems)


def _char_tokenizer(path: str) -> None:
  """A 128-token character-level tokenizer.json."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  vocab = {chr(i): i for i in range(32, 127)}
  vocab.update({f"<c{i}>": i for i in list(range(32)) + [127]})
  tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[],
                                                   unk_token="<c0>"))
  tok.save(os.path.join(path, "tokenizer.json"))


def _checkpoint(path: str, eos: int = 1, tokenizer: bool = True) -> str:
  """A folder with config.json, a tokenizer.json (valid or not) and a
  model.safetensors that is not one: loading its weights fails."""
  os.makedirs(path)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump({"model_type": "qwen3_5_text", "vocab_size": 128,
               "max_position_embeddings": 512, "eos_token_id": eos}, f)
  if tokenizer:
    _char_tokenizer(path)
  else:
    with open(os.path.join(path, "tokenizer.json"), "w") as f:
      f.write("{not json")
  with open(os.path.join(path, "model.safetensors"), "wb") as f:
    f.write(b"\x00" * 64)
  return path


def _unwritable(tmp: str) -> str:
  """A folder this process cannot write in (root may write anywhere but
  in /proc/self; pytest's cleanup restores the permissions it needs)."""
  d = os.path.join(tmp, "read_only")
  os.makedirs(d, exist_ok=True)
  os.chmod(d, 0o555)
  if os.access(d, os.W_OK):
    d = "/proc/self"
  assert not os.access(d, os.W_OK)
  return d


@pytest.fixture(scope="module")
def way(tmp_path_factory):
  """Files and folders that bad flags point at, none to be changed:
  afile, adir/, empty/, and checkpoints with broken parts."""
  root = str(tmp_path_factory.mktemp("in_the_way"))
  with open(os.path.join(root, "afile"), "w") as f:
    f.write("precious\n")
  os.makedirs(os.path.join(root, "adir"))
  with open(os.path.join(root, "adir", "inside.txt"), "w") as f:
    f.write("keep\n")
  os.makedirs(os.path.join(root, "empty"))
  _checkpoint(os.path.join(root, "bad_weights"))
  _checkpoint(os.path.join(root, "bad_tokenizer"), tokenizer=False)
  _checkpoint(os.path.join(root, "bad_eos"), eos=999)
  with open(os.path.join(root, "prompts.jsonl"), "w") as f:
    f.write('{"prompt": "Hi", "id": "a"}\n{"prompt": "Yo"}\n')
  with open(os.path.join(root, "bad_prompts.jsonl"), "w") as f:
    f.write('{"prompt": "Hi"}\n{"prompt": "Yo", "top_p": 2}\n')
  with open(os.path.join(root, "other_results.jsonl"), "w") as f:
    f.write(json.dumps({"id": "a", "index": 0, "text": "x", "num_tokens": 1,
                        "stop_reason": "length", "stop": None,
                        "prompt_tokens": 2, "input_sha256": "0" * 64})
            + "\n")
  return root


def _new(tmp_path, name: str) -> str:
  return str(tmp_path / name)


# ------------------------------------------------------ the path checks
def test_path_checks_name_the_flag_expected_and_found(tmp_path):
  afile = tmp_path / "afile"
  afile.write_text("x")
  adir = tmp_path / "adir"
  adir.mkdir()
  missing = str(tmp_path / "missing")
  cases = [
      (cli.existing_folder, afile, "--f: expected a folder, found a file"),
      (cli.existing_folder, missing, "--f: expected an existing folder, "
       "found nothing at"),
      (cli.existing_file, adir, "--f: expected a file, found a folder"),
      (cli.existing_file, missing, "--f: expected a file, found nothing"),
      (cli.writable_folder, afile, "--f: expected a folder (existing or to "
       "be created), found a file"),
      (cli.writable_folder, afile / "sub", "found a file"),
      (cli.writable_folder, "", "--f: expected a folder to write in, "
       "found ''"),
      (cli.writable_folder, os.path.join(_unwritable(str(tmp_path)), "x"),
       "not writable"),
      (cli.writable_file, adir, "--f: expected a file path to write, found "
       "a folder"),
      (cli.writable_file, os.path.join(missing, "out.json"),
       "--f: expected a file path in an existing folder, found nothing"),
  ]
  for check, path, message in cases:
    with pytest.raises(cli.UserError) as e:
      check("--f", str(path))
    assert message in str(e.value), (check.__name__, path, str(e.value))
    assert str(path) in str(e.value)
  # Accepted, and nothing is created.
  assert cli.existing_folder("--f", str(adir)) == str(adir)
  assert cli.existing_file("--f", str(afile)) == str(afile)
  new = str(tmp_path / "new" / "deeper")
  assert cli.writable_folder("--f", new) == new
  assert cli.writable_file("--f", str(adir / "out.json"))
  assert not os.path.exists(tmp_path / "new")
  assert os.listdir(adir) == []


def test_attention_fallback_runs_the_jnp_attention_after_cudnn_fails():
  """The benchmarks' fallback: cuDNN's failure gives the jnp attention's
  result and the error; other failures are raised."""
  from qwen_jax.config import QwenConfig  # pylint: disable=g-import-not-at-top
  cfg = QwenConfig.from_preset("tiny", attention_implementation="cudnn")

  def fn(c):
    if c.attention_implementation == "cudnn":
      raise RuntimeError("cuDNN\nrefused the shape")
    return c.attention_implementation

  assert cli.attention_fallback(fn, cfg) == (
      "xla", "RuntimeError: cuDNN refused the shape")
  assert cli.attention_fallback(fn, cfg.replace(
      attention_implementation="xla")) == ("xla", None)
  with pytest.raises(RuntimeError, match="cuDNN"):
    cli.attention_fallback(fn, cfg, fatal=lambda e: True)

  def broken(c):
    raise ValueError("no attention at all")

  with pytest.raises(ValueError):
    cli.attention_fallback(broken, cfg.replace(
        attention_implementation="xla"))


def test_int_lists_and_flag_error_statuses():
  from absl import flags  # pylint: disable=g-import-not-at-top
  assert cli.int_list("--l", ["1", "", "16"]) == [1, 16]
  for bad in (["0"], ["1", "x"], ["-2"]):
    with pytest.raises(cli.UserError, match="--l: expected comma-separated "
                       "ints >= 1"):
      cli.int_list("--l", bad)
  assert cli.positive_int("--n", 3) == 3
  for bad in (0, True, 1.5):
    with pytest.raises(cli.UserError, match="--n: expected an int >= 1"):
      cli.positive_int("--n", bad)
  status, _ = cli._flag_error(flags.UnrecognizedFlagError("nope"))
  assert status == cli.EXIT_USAGE
  status, message = cli._flag_error(flags.IllegalFlagValueError(
      "flag --workdir=None: Flag --workdir must have a value other than "
      "None."))
  assert (status, message) == (cli.EXIT_USAGE, "--workdir: required, not "
                               "given")
  status, _ = cli._flag_error(flags.IllegalFlagValueError(
      "flag --batch=0: 0 is not a positive integer"))
  assert status == cli.EXIT_ERROR


# ---------------------------------------------------------------- scripts
def test_forward_misuse(way):
  afile = os.path.join(way, "afile")
  _check_cases("forward", [
      Case(["extra_arg"], ["extra_arg"], status=2),
      Case(["--nope=1"], ["nope"], status=2),
      Case(["--batch=0"], ["--batch"]),
      Case(["--checkpoint", afile], ["--checkpoint", afile, "a file"]),
      Case(["--checkpoint", os.path.join(way, "empty")],
           ["--checkpoint", "config.json"]),
  ], way)


def test_generate_misuse(way, tmp_path):
  weights = os.path.join(way, "bad_weights")
  prompts = os.path.join(way, "prompts.jsonl")
  out = _new(tmp_path, "out.jsonl")
  _check_cases("generate", [
      Case(["--checkpoint", os.path.join(way, "bad_tokenizer")],
           ["tokenizer.json", "bad_tokenizer"]),
      # Flags first: the broken weights are never read.
      Case(["--checkpoint", weights, "--max_new_tokens=0"],
           ["--max_new_tokens"]),
      Case(["--checkpoint", weights, "--temperature=-1"], ["--temperature"]),
      Case(["--checkpoint", weights, "--quantize=int3"],
           ["--quantize", "int3"]),
      Case(["--checkpoint", weights, "--prompt="], ["--prompt"]),
      Case(["--checkpoint", weights, "--prompt=xxxx",
            "--max_new_tokens=600"], ["--max_new_tokens", "512"]),
      # An eos id of config.json outside the vocabulary is the file's fault.
      Case(["--checkpoint", os.path.join(way, "bad_eos")],
           ["config.json", "eos_token_id", "999"],
           not_prefix="--stop_tokens"),
      # Images and videos: paths, then whether the model takes them.
      Case(["--image", os.path.join(way, "nothing.png")],
           ["--image", "nothing.png"]),
      Case(["--video", os.path.join(way, "afile")], ["--video", "afile"]),
      Case(["--video", os.path.join(way, "adir")],
           ["--video", "adir", "frame images"]),
      Case(["--image", os.path.join(way, "afile")],
           ["--image", "afile", "Pillow cannot read"]),
      Case(["--checkpoint", weights, "--image", os.path.join(way, "afile")],
           ["--image", "vision tower"]),
      # Every flag good: the weights' error is one line too.
      Case(["--checkpoint", weights], ["model.safetensors"]),
      # Batch mode: the prompts and the output file, before the weights.
      Case(["--checkpoint", weights, "--prompts_file", prompts],
           ["--output", "required with --prompts_file"]),
      Case(["--checkpoint", weights, "--prompts_file",
            os.path.join(way, "bad_prompts.jsonl"), "--output", out],
           ["--prompts_file", "line 2", "top_p", "found 2"],
           not_created=[out]),
      Case(["--checkpoint", weights, "--prompts_file", prompts, "--output",
            os.path.join(way, "afile")],
           ["--output", "afile", "line 1", "not ours"]),
      Case(["--checkpoint", weights, "--prompts_file", prompts, "--output",
            os.path.join(way, "other_results.jsonl")],
           ["--output", "line 1", "id 'a'", "another prompts file"]),
  ], way)


def test_chat_misuse(way):
  weights = os.path.join(way, "bad_weights")
  _check_cases("chat", [
      Case([], ["--checkpoint", "required"], status=2),
      Case(["--checkpoint", weights, "hello"], ["hello"], status=2),
      Case(["--checkpoint", os.path.join(way, "bad_tokenizer")],
           ["tokenizer.json", "bad_tokenizer"]),
      Case(["--checkpoint", weights, "--min_p=2"], ["--min_p", "found 2"]),
      # Its tokenizer has no chat template: said before the weights.
      Case(["--checkpoint", weights], ["--checkpoint", "chat template"]),
  ], way)


def test_train_misuse(way, tmp_path):
  afile = os.path.join(way, "afile")
  new = _new(tmp_path, "run")
  _check_cases("train", [
      Case([MQAR_LOCAL, f"--workdir={afile}"], ["--workdir", afile]),
      Case([MQAR_LOCAL], ["--workdir", "required"], status=2),
      Case([MQAR_LOCAL, f"--workdir={new}", "--config.train.nope=3"],
           ["--config.train.nope"], not_created=[new]),
      Case([MQAR_LOCAL, f"--workdir={new}", "--config.trian.num_steps=3"],
           ["--config.trian.num_steps", "train"], not_created=[new]),
      Case(["--config=experiments/configs/nope.py", f"--workdir={new}"],
           ["--config", "experiments/configs/nope.py"], not_created=[new]),
      Case(["--config=experiments/configs/mqar.py:nope", f"--workdir={new}"],
           ["--config", "'nope'"], not_created=[new]),
      Case([MQAR_LOCAL, f"--workdir={new}", f"--export_hf={afile}"],
           ["--export_hf", afile], not_created=[new]),
      # A folder holding other files is no training workdir.
      Case([MQAR_LOCAL, f"--workdir={os.path.join(way, 'adir')}"],
           ["--workdir", "inside.txt"]),
      # A folder the export could not keep: refused before training.
      Case([MQAR_LOCAL, f"--workdir={new}",
            f"--export_hf={os.path.join(way, 'bad_weights')}"],
           ["--export_hf", "bad_weights", "model.safetensors"],
           not_created=[new]),
      Case([MQAR_LOCAL, f"--workdir={new}", "--allow_changes=train.lr"],
           ["--allow_changes", "train.lr"], not_created=[new]),
      Case([MQAR_LOCAL,
            f"--workdir={os.path.join(_unwritable(str(tmp_path)), 'run')}"],
           ["--workdir", "not writable"]),
      Case([MQAR_LOCAL, f"--workdir={new}", "--mesh=data:3"],
           ["--mesh", "data:3", "device count"], not_created=[new]),
      Case([MQAR_LOCAL, f"--workdir={new}", "--process_id=1"],
           ["--process_id", "--distributed"], not_created=[new]),
  ], way)


def test_train_finetune_misuse(way, tmp_path):
  """experiments.train with the finetune config: the config, the
  checkpoint's config.json and the data are checked before any weight is
  read (the checkpoint's weights are broken), and a refused run leaves no
  workdir behind."""
  new = _new(tmp_path, "ft")
  ft = "--config=experiments/configs/finetune.py"
  init = f"--config.init_checkpoint={os.path.join(way, 'bad_weights')}"
  data = f"--config.data.path={os.path.join(way, 'prompts.jsonl')}"
  short = "--config.train.seq_len=64"
  _check_cases("train", [
      Case([ft, f"--workdir={new}"], ["config.init_checkpoint", "found none"],
           not_created=[new]),
      Case([ft, init, data, f"--workdir={new}", short,
            "--config.lora_rank=-1"], ["config.lora_rank", "-1"],
           not_created=[new]),
      # The checkpoint's max_position_embeddings is 512.
      Case([ft, init, data, f"--workdir={new}"],
           ["config.train.seq_len", "512", "2048"], not_created=[new]),
      # Lines that are neither text nor a conversation, named file:line.
      Case([ft, init, data, f"--workdir={new}", short,
            "--config.data.append_eos=false"],
           [f"{os.path.join(way, 'prompts.jsonl')}:1", "\"messages\""],
           not_created=[new]),
  ], way)


def test_compare_ratios_misuse(way, tmp_path):
  new = _new(tmp_path, "study")
  _check_cases("compare_ratios", [
      Case(["--preset=smoke"], ["--workdir", "required"], status=2),
      Case(["--preset=smoke", f"--workdir={os.path.join(way, 'afile')}"],
           ["--workdir", "afile"]),
      Case(["--preset=smoke", f"--workdir={new}", "--steps=0"],
           ["--steps", "found 0"], not_created=[new]),
  ], way)


def test_long_context_misuse(way):
  aot = ["--aot", "--preset=tiny", "--seq_len=64"]
  _check_cases("long_context", [
      Case(aot + [f"--json_out={os.path.join(way, 'adir')}"],
           ["--json_out", "a folder"]),
      Case(aot + [f"--hlo_out={os.path.join(way, 'nothing', 'x.txt')}"],
           ["--hlo_out", "nothing"]),
      Case(["--verify", "--preset=tiny", "--seq_len=64", "--loss_chunk=-1"],
           ["--loss_chunk", "found -1"]),
      Case(aot + ["--distributed", "--num_processes=2", "--process_id=2"],
           ["--process_id", "expected 0 to 1", "found 2"]),
  ], way)


def test_bench_gated_delta_rule_misuse(way):
  _check_cases("bench_gated_delta_rule", [
      Case(["--interpret", "extra_arg"], ["extra_arg"], status=2),
      Case(["--interpret", "--iters=0"], ["--iters"]),
      Case(["--interpret", "--implementations=pallas,nope"],
           ["--implementations", "nope"]),
      Case(["--interpret", "--pallas_variants=bogus=1"],
           ["--pallas_variants", "bogus"]),
      Case(["--interpret", f"--json_out={os.path.join(way, 'adir')}"],
           ["--json_out", "a folder"]),
  ], way)


def test_bench_vision_misuse(way):
  _check_cases("bench_vision", [
      Case(["--image_size=100", "--hf=false"], ["--image_size", "32",
                                                "found 100"]),
      Case(["--preset=nope", "--hf=false"], ["--preset", "nope"]),
  ], way)


def test_bench_moe_misuse(way):
  _check_cases("bench_moe", [
      Case(["--experts=8", "--top_k=9"], ["--top_k", "8", "found 9"]),
      Case(["--tokens=0"], ["--tokens"]),
  ], way)


def test_bench_generate_misuse(way):
  _check_cases("bench_generate", [
      Case(["--small", "--decode_batches=0"], ["--decode_batches"]),
      Case(["--small", "--prefill_lengths=64,abc"], ["--prefill_lengths"]),
      Case(["--preset=nope"], ["--preset", "nope"]),
      Case(["--small", "--decode_prompt=5000"], ["--decode_prompt", "4096"]),
      Case(["--small", "--variants=scan,int3"], ["--variants", "int3"]),
      Case(["--small", "--variants=scan", "--prefill_variants=int8"],
           ["--prefill_variants", "int8"]),
      Case(["--small", f"--json_out={os.path.join(way, 'adir')}"],
           ["--json_out", "a folder"]),
  ], way)


def test_bench_train_misuse(way):
  _check_cases("bench_train", [
      Case(["--small", "--seq_lens=64,abc"], ["--seq_lens"]),
      Case(["--small", "--steps=0"], ["--steps", "found 0"]),
      Case(["--preset=nope"], ["--preset", "nope"]),
      Case(["--small", "--seq_lens=5000"], ["--seq_lens", "4096"]),
      Case(["--small", "--gdr_block_sizes=bogus=1"],
           ["--gdr_block_sizes", "bogus"]),
      Case(["--small", f"--json_out={os.path.join(way, 'adir')}"],
           ["--json_out", "a folder"]),
  ], way)


def test_model_memory_misuse(way):
  _check_cases("model_memory", [
      Case(["--preset=tiny", "--programs=train,fit"], ["--programs", "fit"]),
      Case(["--preset=tiny", "--seq_lens=0"], ["--seq_lens"]),
      Case(["--preset=tiny", "--seq_lens=5000"], ["--seq_lens", "4096"]),
      Case(["--preset=tiny", "--prefill_block=1"], ["--prefill_block"]),
      Case(["--preset=tiny", "--seq_lens=64", "--decode_cache=5000"],
           ["--decode_cache", "found 5000"]),
      Case(["--preset=tiny", "--seq_lens=64",
            f"--json_out={os.path.join(way, 'adir')}"],
           ["--json_out", "a folder"]),
  ], way)


# ------------------------------------------------------------ train Ctrl-C
def test_train_ctrl_c_names_the_last_checkpoint(tmp_path):
  workdir = str(tmp_path / "run")
  ckpts = os.path.join(workdir, "checkpoints")
  proc = subprocess.Popen(
      [sys.executable, "-m", "experiments.train", MQAR_LOCAL,
       f"--workdir={workdir}", "--config.train.num_steps=100000",
       "--config.train.checkpoint_every=1"],
      cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True)
  try:
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline and proc.poll() is None:
      if os.path.isdir(ckpts) and any(s.isdigit() for s in os.listdir(ckpts)):
        break
      time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=TIMEOUT_S)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.communicate()
  assert "Traceback" not in stderr, stderr[-3000:]
  progress = re.compile(r"^mqar \[[#.]+\] \d+/\d+ ")
  lines = _error_lines(stderr, progress)
  assert len(lines) == 1, stderr[-3000:]
  assert proc.returncode == cli.EXIT_INTERRUPTED, (proc.returncode, lines)
  line = lines[0]
  assert line.startswith("experiments.train: error: interrupted"), line
  steps = sorted(int(s) for s in os.listdir(ckpts) if s.isdigit())
  assert steps, os.listdir(ckpts)
  # Ctrl-C waits for a save in progress: no half-written step is left.
  assert len(steps) == len(os.listdir(ckpts)), os.listdir(ckpts)
  # The newest checkpoint on disk is the one named, with its folder.
  assert f"step {steps[-1]}" in line, (line, steps)
  assert os.path.join(ckpts, str(steps[-1])) in line, line


def test_interrupt_message_names_the_newest_complete_checkpoint(tmp_path):
  from experiments import train  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "run")
  assert train.interrupt_message(workdir) == (
      f"no checkpoint was written yet in {workdir}/checkpoints")
  assert "writes no checkpoints" in train.interrupt_message(workdir, False)
  for name in ("1", "12", "9", "13.orbax-checkpoint-tmp"):
    os.makedirs(os.path.join(workdir, "checkpoints", name))
  assert train.interrupt_message(workdir).startswith(
      f"the last checkpoint is step 12 in {workdir}/checkpoints/12;")


def test_a_bug_in_a_config_file_keeps_its_traceback(tmp_path):
  """Only misuse is one line: an exception that is a bug (here in a config
  file's code, whichever way ml_collections passes it on) keeps its
  traceback."""
  for error in ("AttributeError", "TypeError"):
    path = tmp_path / f"buggy_{error}.py"
    path.write_text(f"def get_config(arg=None):\n"
                    f"  raise {error}('a bug in get_config')\n")
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.train", f"--config={path}",
         f"--workdir={tmp_path / 'run'}"], cwd=ROOT, env=_env(),
        capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" in proc.stderr, proc.stderr[-2000:]
    assert f"{error}('a bug in get_config')" in proc.stderr or (
        f"{error}: a bug in get_config" in proc.stderr), proc.stderr[-2000:]
    assert "experiments.train: error:" not in proc.stderr
    assert not (tmp_path / "run").exists()
