"""Command-line plumbing of the experiment scripts: one-line errors, paths.

Every script under experiments/ that people run ends with `cli.run(main)`
instead of `absl.app.run(main)`. A misuse then ends with exactly one line
on stderr and no traceback,

  experiments.NAME: error: MESSAGE

where MESSAGE names the flag, path or config field, what was expected and
what was found, and the exit status says what kind of misuse it was:

  0    success.
  1    bad input: a flag value out of range, a path that is missing, of the
       wrong kind or not writable, a bad config file or config field, a
       broken checkpoint or tokenizer file (`UserError`, absl's flag value
       errors, ml_collections' config errors).
  2    usage: an unknown flag, a positional argument (no script takes one),
       a required flag not given, a flag without its value
       (`absl.app.UsageError`, absl's parse errors).
  130  interrupted (Ctrl-C; 128 + SIGINT, as a shell reports it).
       experiments.train names its last checkpoint (step and folder);
       the scripts that save checkpoints hold Ctrl-C until a save in
       progress is complete (`hold_interrupts_inside`).

Any other exception is a bug: it keeps its traceback (exit status 1).

In a multi-process run (--distributed, experiments/multihost.py) an error
in one process, a misuse or a bug, ends every process: the failing one
writes its line as above, each other one writes
`experiments.NAME: error: process K of N failed: MESSAGE` and exits 1
(`qwen_jax.distributed.abort`), none waits in a collective for it.

Each script checks all its flags and paths before it loads a checkpoint,
imports an optional heavy module (torch, transformers, fla) or compiles
anything, with the path checks here (`existing_folder`, `existing_file`,
`writable_folder`, `writable_file`), so that a misuse fails in seconds and
leaves every file as it was.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import signal
import sys
import traceback
from typing import Any, Callable, Iterator, NoReturn, Sequence

from absl import app
from absl import flags

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UserError(ValueError):
  """Bad input, reported as one line naming the flag, path or field."""


def script_name() -> str:
  """"experiments.NAME" of the running script (`python -m ...`)."""
  spec = getattr(sys.modules.get("__main__"), "__spec__", None)
  if spec is not None and spec.name:
    return spec.name
  return os.path.splitext(os.path.basename(sys.argv[0] or "experiments"))[0]


def one_line(text: Any) -> str:
  """`text` with its lines joined by spaces (messages are single lines)."""
  return " ".join(s.strip() for s in str(text).splitlines() if s.strip())


def _distributed_run() -> Any:
  """qwen_jax.distributed when this process has joined a multi-process run
  (imported only if a script imported it), else None."""
  module = sys.modules.get("qwen_jax.distributed")
  return module if module is not None and module.is_active() else None


def fail(message: Any, status: int = EXIT_ERROR,
         name: str | None = None) -> NoReturn:
  """Writes "NAME: error: MESSAGE" to stderr and exits with `status`.

  In a multi-process run (`qwen_jax.distributed`), every other process
  then ends too, with the message and the index of this process.
  """
  run_ = _distributed_run()
  if run_ is not None:
    run_.abort(one_line(message), status)
  sys.stdout.flush()
  sys.stderr.write(f"{name or script_name()}: error: {one_line(message)}\n")
  sys.stderr.flush()
  raise SystemExit(status)


@contextlib.contextmanager
def user_errors(prefix: str = "") -> Iterator[None]:
  """Turns a ValueError raised in the block into a UserError.

  For library calls whose ValueError means bad input (a broken checkpoint,
  an unknown preset); `prefix` (e.g. "--checkpoint DIR") goes before the
  message.
  """
  try:
    yield
  except UserError:
    raise
  except ValueError as e:
    raise UserError(f"{prefix}: {e}" if prefix else str(e)) from e


# ------------------------------------------------------------------ paths
def _what(path: str) -> str:
  """What is at an existing path, for messages."""
  if os.path.isdir(path):
    return "a folder"
  if os.path.isfile(path):
    return "a file"
  if os.path.islink(path):
    return "a broken link"
  return "something that is neither a file nor a folder"


def _not_empty(flag: str, path: Any, expected: str) -> str:
  if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
    raise UserError(f"{flag}: expected {expected}, found {path!r}")
  return os.fspath(path)


def existing_folder(flag: str, path: Any) -> str:
  """`path` if it is an existing folder, else a UserError naming `flag`."""
  path = _not_empty(flag, path, "a folder")
  if os.path.isdir(path):
    return path
  if not os.path.lexists(path):
    raise UserError(f"{flag}: expected an existing folder, found nothing at "
                    f"{path!r}")
  raise UserError(f"{flag}: expected a folder, found {_what(path)} {path!r}")


def existing_file(flag: str, path: Any, what: str = "a file") -> str:
  """`path` if it is an existing readable file, else a UserError.

  `what` describes the file in the message ("a config file", ...).
  """
  path = _not_empty(flag, path, what)
  if os.path.isfile(path):
    if not os.access(path, os.R_OK):
      raise UserError(f"{flag}: expected {what} it can read, found a file "
                      f"that is not readable {path!r}")
    return path
  if not os.path.lexists(path):
    raise UserError(f"{flag}: expected {what}, found nothing at {path!r}")
  raise UserError(f"{flag}: expected {what}, found {_what(path)} {path!r}")


def _nearest_existing(path: str) -> str:
  path = os.path.abspath(path)
  while not os.path.lexists(path):
    parent = os.path.dirname(path)
    if parent == path:
      break
    path = parent
  return path


def _writable_dir(path: str) -> bool:
  return os.access(path, os.W_OK | os.X_OK)


def writable_folder(flag: str, path: Any) -> str:
  """`path` if it is a folder the script can write in or create.

  Accepted: an existing writable folder, or a path that does not exist
  whose nearest existing parent is a writable folder (the script creates
  it later, after every other check). Refused, with a UserError naming
  `flag`: a file (or anything not a folder) at the path or in its parents,
  and a folder that is not writable. Nothing is created or changed here.
  """
  path = _not_empty(flag, path, "a folder to write in")
  if os.path.isdir(path):
    if not _writable_dir(path):
      raise UserError(f"{flag}: expected a folder it can write in, found a "
                      f"folder that is not writable {path!r}")
    return path
  if os.path.lexists(path):
    raise UserError(f"{flag}: expected a folder (existing or to be "
                    f"created), found {_what(path)} {path!r}")
  parent = _nearest_existing(path)
  if not os.path.isdir(parent):
    raise UserError(f"{flag}: expected a folder that can be created at "
                    f"{path!r}, found {_what(parent)} {parent!r} in its "
                    f"path")
  if not _writable_dir(parent):
    raise UserError(f"{flag}: expected a folder that can be created at "
                    f"{path!r}, found its nearest existing folder "
                    f"{parent!r} not writable")
  return path


def writable_file(flag: str, path: Any) -> str:
  """`path` if the script can write a file there (created or replaced).

  Its folder must exist and be writable; a folder at the path itself, or a
  file that is not writable, is refused with a UserError naming `flag`.
  """
  path = _not_empty(flag, path, "a file path to write")
  if os.path.lexists(path) and not os.path.isfile(path):
    raise UserError(f"{flag}: expected a file path to write, found "
                    f"{_what(path)} {path!r}")
  if os.path.isfile(path) and not os.access(path, os.W_OK):
    raise UserError(f"{flag}: expected a file path to write, found a file "
                    f"that is not writable {path!r}")
  parent = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(parent):
    found = ("nothing" if not os.path.lexists(parent)
             else _what(parent))
    raise UserError(f"{flag}: expected a file path in an existing folder, "
                    f"found {found} at {parent!r} (the folder of "
                    f"{path!r})")
  if not _writable_dir(parent):
    raise UserError(f"{flag}: expected a file path in a folder it can write "
                    f"in, found the folder {parent!r} of {path!r} not "
                    f"writable")
  return path


# ------------------------------------------------------------------ flags
def benchmark_outputs(json_out: str | None, hf: bool) -> None:
  """A benchmark's --json_out (writable when given) and --hf (torch and
  transformers importable), checked before anything is built.

  Raises:
    UserError: naming the flag.
  """
  if json_out is not None:
    writable_file("--json_out", json_out)
  if hf:
    missing = [m for m in ("torch", "transformers")
               if importlib.util.find_spec(m) is None]
    if missing:
      raise UserError(f"--hf: expected torch and transformers installed, "
                      f"found {' and '.join(missing)} missing")


def attention_fallback(fn: Callable[[Any], Any], cfg: Any,
                       fatal: Callable[[BaseException], bool] | None = None
                       ) -> tuple[Any, str | None]:
  """(fn(cfg), None); when cuDNN's attention fails where jax could not
  tell beforehand (XLA's compile), (fn(cfg with the jnp attention), the
  error in one line). A benchmark's rows then say which attention ran.
  Errors of another attention, or those `fatal` picks, are raised."""
  try:
    return fn(cfg), None
  except Exception as e:  # pylint: disable=broad-except
    if cfg.attention_implementation != "cudnn" or (fatal and fatal(e)):
      raise
    error = one_line(f"{type(e).__name__}: {e}")[:300]
    print(f"NOTE: cuDNN's attention failed ({error}); the jnp attention "
          f"runs instead", flush=True)
    import jax  # pylint: disable=g-import-not-at-top
    jax.clear_caches()
    return fn(cfg.replace(attention_implementation="xla")), error


def positive_int(flag: str, value: Any, low: int = 1) -> int:
  """`value` if it is an int >= low, else a UserError naming `flag`."""
  if isinstance(value, bool) or not isinstance(value, int) or value < low:
    raise UserError(f"{flag}: expected an int >= {low}, found {value!r}")
  return value


def int_list(flag: str, values: Sequence[Any] | None, low: int = 1,
             ) -> list[int]:
  """The ints of a list flag (empty entries skipped), each >= low."""
  out = []
  for v in values or ():
    v = str(v).strip()
    if not v:
      continue
    try:
      n = int(v)
    except ValueError:
      n = None
    if n is None or n < low:
      raise UserError(f"{flag}: expected comma-separated ints >= {low}, "
                      f"found {','.join(map(str, values))!r}")
    out.append(n)
  return out


_REQUIRED = re.compile(r"Flag --(\S+?) must have a value other than None")
_CONFIG_FILE = "Error whilst parsing config file"
_LAST_EXCEPTION = re.compile(r"^(\w+(?:\.\w+)*): (.*)$")


def _config_file_error(text: str) -> str | None:
  """One line for an ml_collections config file that raised a ValueError.

  ml_collections wraps it in an absl flag error whose text holds the
  traceback; a ValueError is bad input (the message is kept), any other
  exception a bug in the file (None: its traceback is shown).
  """
  head = text.split(_CONFIG_FILE, 1)[0].strip().rstrip(":")
  lines = [s.strip() for s in text.splitlines() if s.strip()]
  match = _LAST_EXCEPTION.match(lines[-1]) if lines else None
  if not match or match.group(1) not in ("ValueError", "UserError"):
    return None
  return f"{head.removeprefix('flag ')}: {match.group(2)}"


def _flag_error(e: flags.Error) -> tuple[int, str]:
  """(exit status, message) of an absl flag error."""
  text = str(e)
  if isinstance(e, flags.UnrecognizedFlagError):
    return EXIT_USAGE, f"{one_line(text)} (--helpshort lists the flags)"
  required = _REQUIRED.search(text)
  if required:
    return EXIT_USAGE, f"--{required.group(1)}: required, not given"
  if _CONFIG_FILE in text:
    message = _config_file_error(text)
    if message is None:  # a bug in the config file: show its traceback
      return EXIT_ERROR, text
    return EXIT_ERROR, message
  if type(e) is flags.Error:  # pylint: disable=unidiomatic-typecheck
    # Command-line syntax, e.g. "Missing value for flag --x".
    return EXIT_USAGE, text
  return EXIT_ERROR, text


def _from_ml_collections(e: BaseException, module: str) -> bool:
  frames = traceback.extract_tb(e.__traceback__)
  return any(f.filename.replace(os.sep, "/").endswith(
      f"ml_collections/config_flags/{module}") for f in frames)


def _innermost_text(e: BaseException) -> str:
  """The message of an exception that wraps others in its args."""
  while e.args and isinstance(e.args[0], BaseException):
    e = e.args[0]
  return str(e.args[0]) if e.args else str(e)


def _config_override_error(e: BaseException,
                           argv: Sequence[str]) -> str | None:
  """One line for `--config.a.b=v` naming a field the config lacks.

  ml_collections raises AttributeError or KeyError while it resolves the
  override; None for an exception from anywhere else (a bug).
  """
  if not _from_ml_collections(e, "config_path.py"):
    return None
  text = _innermost_text(e)
  lines = [s.strip() for s in text.splitlines() if s.strip()]
  name = re.match(r"'([^']*)'$", lines[0]) if lines else None
  overrides = [a.split("=", 1)[0].lstrip("-") for a in argv[1:]
               if re.match(r"--?\w+\.\w", a)]
  if name:
    key = name.group(1)
    hits = [o for o in overrides if key in o.split(".")[1:]]
    flag = f"--{hits[0]}" if hits else "a config override"
    parent = hits[0].split(f".{key}", 1)[0] if hits else "the config"
    hint = ""
    if len(lines) > 1:  # ml_collections' "Did you mean ..."
      hint = f" ({lines[1][:1].lower()}{lines[1][1:]})"
    return f"{flag}: expected a field of {parent}, found no field {key!r}{hint}"
  hits = [o for o in overrides if o.split(".", 1)[1] in text]
  flag = f"--{hits[-1]}" if hits else "a config override"
  return f"{flag}: {one_line(text)}"


def _config_load_error(error: BaseException) -> str:
  """One line for a config file that could not be loaded."""
  cause = getattr(error, "_error", None) or error.__cause__ or error
  text = str(cause)
  name = re.search(r"Failed loading config file (\w+?)_config", text)
  flag = f"--{name.group(1)}" if name else "--config"
  lines = [s.strip() for s in text.splitlines() if s.strip()]
  return (f"{flag}: expected a config file it can load, found "
          f"{lines[-1] if lines else text}")


def _check_config_flags() -> None:
  """Reports a config file that ml_collections failed to load.

  ml_collections defers that error to the first use of the config; here it
  is one line before `main` runs.
  """
  for name in list(flags.FLAGS):
    try:
      value = flags.FLAGS[name].value
    except flags.Error:
      continue
    if type(value).__name__ == "_ErrorConfig":
      raise UserError(_config_load_error(object.__getattribute__(
          value, "_error")).replace("--config", f"--{name}", 1))


def _inside(frame: Any, packages: Sequence[str]) -> bool:
  """Whether a frame or its callers run code of one of the packages."""
  markers = [f"{os.sep}{p}{os.sep}" for p in packages]
  while frame is not None:
    if any(m in frame.f_code.co_filename for m in markers):
      return True
    frame = frame.f_back
  return False


def hold_interrupts_inside(*packages: str) -> None:
  """Makes Ctrl-C wait while the main thread runs code of `packages`.

  For orbax: an interrupt in the middle of a checkpoint save leaves a
  half-written step and orbax's writer threads running. KeyboardInterrupt
  is raised as usual elsewhere; inside those packages it is raised as soon
  as they return to the caller (checked every 50 ms with SIGALRM). A
  second Ctrl-C interrupts at once. Without SIGALRM (Windows) nothing
  changes.
  """
  if not hasattr(signal, "setitimer"):
    return
  pending = False

  def on_signal(signum: int, frame: Any) -> None:
    nonlocal pending
    if signum == signal.SIGALRM and not pending:
      return
    if not (signum == signal.SIGINT and pending) and _inside(frame,
                                                             packages):
      pending = True
      signal.setitimer(signal.ITIMER_REAL, 0.05)
      return
    pending = False
    signal.setitimer(signal.ITIMER_REAL, 0)
    raise KeyboardInterrupt

  signal.signal(signal.SIGINT, on_signal)
  signal.signal(signal.SIGALRM, on_signal)


def _interrupted(name: str,
                 on_interrupt: Callable[[], str] | None) -> NoReturn:
  signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C: no trace
  message = "interrupted (Ctrl-C)"
  if on_interrupt is not None:
    message += f"; {on_interrupt()}"
  sys.stdout.flush()
  sys.stderr.write(f"{name}: error: {one_line(message)}\n")
  sys.stderr.flush()
  # Exit without the interpreter's teardown: an XLA compilation that Ctrl-C
  # interrupted goes on in native threads, and tearing Python down under
  # them crashes (a segmentation fault after the message).
  os._exit(EXIT_INTERRUPTED)  # pylint: disable=protected-access


def run(main: Callable[[list[str]], Any], name: str | None = None,
        on_interrupt: Callable[[], str] | None = None) -> None:
  """`absl.app.run(main)` with the one-line errors of this module.

  Args:
    main: the script's main(argv); it gets argv without flags, after the
      runner refused any positional argument.
    name: "experiments.NAME" of the messages (default: the running module).
    on_interrupt: called after Ctrl-C; what it returns is added to the
      message (experiments.train: where its last checkpoint is).
  """
  name = name or script_name()

  def parse(argv: list[str]) -> list[str]:
    try:
      rest = flags.FLAGS(argv)
      _check_config_flags()
      return rest
    except KeyboardInterrupt:
      _interrupted(name, None)
    except UserError as e:
      fail(e, EXIT_ERROR, name)
    except flags.Error as e:
      status, message = _flag_error(e)
      if "\n" in message and "Traceback" in message:
        raise  # a bug in a config file: its traceback is the message
      fail(message, status, name)
    except (AttributeError, KeyError) as e:
      message = _config_override_error(e, argv)
      if message is None:
        raise
      fail(message, EXIT_ERROR, name)
    except OSError as e:
      if "earlier failure to load" not in str(e):
        raise
      fail(_config_load_error(e), EXIT_ERROR, name)

  def guarded(argv: list[str]) -> Any:
    try:
      if len(argv) > 1:
        raise app.UsageError(
            f"unexpected positional argument{'s' if len(argv) > 2 else ''} "
            f"{' '.join(map(repr, argv[1:]))} (flags are written "
            f"--name=value; --helpshort lists them)")
      return main(argv)
    except KeyboardInterrupt:
      _interrupted(name, on_interrupt)
    except app.UsageError as e:
      fail(e, EXIT_USAGE, name)
    except UserError as e:
      fail(e, EXIT_ERROR, name)
    except Exception as e:  # pylint: disable=broad-except
      if _distributed_run() is None:
        raise
      # A bug, or a collective whose peer died: the traceback, then every
      # process ends (the others would wait in their next collective).
      if not _distributed_run().ending():
        traceback.print_exc()
      fail(f"{type(e).__name__}: {e}", EXIT_ERROR, name)

  app.run(guarded, flags_parser=parse)
