"""What every launcher shares: one-line errors for a user's mistakes, `--help` that exits 0, and a
quiet JAX start-up.

  if __name__ == "__main__":
    _cli.run(main, "launch.train")

A user's mistake (a bad flag, an unknown or invalid `--config.KEY`, a path that does not exist, a
`UsageError` or `UserError` raised by `main`) prints one line `launch.X: error: ...` naming the flag
and exits 2. Anything else is a bug in consist and keeps its traceback.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Callable, NoReturn, Sequence

from absl import app, flags
from absl import logging as absl_logging

USAGE_EXIT = 2
# Exit status of a run stopped by Ctrl-C after saving its checkpoint (128 + SIGINT, the shell's convention).
EXIT_INTERRUPTED = 130
HELP_FLAGS = ("--help", "-?", "--helpshort", "--helpfull", "--helpxml")


class UserError(Exception):
  """A mistake in the user's input the launcher reports in one line (`exit_code`: 2 = usage)."""

  def __init__(self, message: str, exit_code: int = USAGE_EXIT):
    super().__init__(message)
    self.exit_code = exit_code


class _DropTpuProbe(logging.Filter):
  """JAX tries every backend; on a machine without a TPU its failed TPU probe is no news."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Unable to initialize backend 'tpu'")


def quiet_jax_startup() -> None:
  logging.getLogger("jax._src.xla_bridge").addFilter(_DropTpuProbe())


def fail(prog: str, message: str, exit_code: int = USAGE_EXIT) -> NoReturn:
  print(f"{prog}: error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
  sys.exit(exit_code)


def _config_overrides(argv: Sequence[str]) -> list[str]:
  return [a for a in argv if re.match(r"^--?(no)?config\.", a)]


def config_error_message(message: str, argv: Sequence[str]) -> str:
  """A consist ConfigError ('optim.learning_rate: must be ...', "unknown config key 'train.x' ...")
  as the flag that sets it: '--config.optim.learning_rate=-1.0: must be ...'."""
  match = re.match(r"^(?:unknown|missing) config key '([\w.\[\]]+)'", message)
  key = match.group(1) if match else None
  if key is None:
    match = re.match(r"^([a-z_]\w*(?:\.\w+)*(?:\[\d+\])?): ", message)
    if match:
      key, message = match.group(1), message[match.end():]
  if key is None:
    return f"--config: {message}"
  given = [a for a in _config_overrides(argv) if a.split("=", 1)[0].lstrip("-") == f"config.{key}"]
  return f"{given[-1] if given else '--config.' + key}: {message}"


def _override_error_message(error: Exception, argv: Sequence[str]) -> str:
  """ml_collections raises AttributeError / KeyError / TypeError for a bad --config.KEY override,
  with an escaped repr as its message; name the override and say it plainly."""
  text = str(error)
  for _ in range(2):  # AttributeError("'\\'stepz\\'\\nDid you mean ...'"): undo the repr layers
    if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
      text = text[1:-1].encode().decode("unicode_escape")
  lines = [l.strip() for l in text.splitlines() if l.strip()]
  missing = re.match(r"^'([^']+)'$", lines[0]) if lines else None
  overrides = _config_overrides(argv)
  if missing:
    name = missing.group(1)
    culprits = [a for a in overrides if name in a.split("=", 1)[0].split(".")[1:]] or overrides
    hint = " ".join(lines[1:])
    return (f"{' '.join(culprits) or '--config'}: unknown config key '{name}'"
            + (f" ({hint})" if hint else "") + "; --helpfull lists every config key")
  return f"{' '.join(overrides) or '--config'}: {' '.join(lines) or type(error).__name__}"


def _flag_error_message(text: str) -> str:
  """absl's message, without the traceback ml_collections puts in it when a config file raised."""
  head, sep, tail = text.partition("Traceback (most recent call last):")
  if sep:
    last = [l.strip() for l in tail.splitlines() if l.strip()][-1]
    last = re.sub(r"^[\w.]*(Error|Exception): ", "", last)
    head = re.sub(r"\s*Error whilst parsing config file:\s*$", "", head.strip())
    text = f"{head.strip().rstrip(':')}: {last}"
  text = re.sub(r"^flag (--\S+): ", r"\1: ", text)
  return f"{text}; see --help"


def _parser(prog: str) -> Callable[[list[str]], list[str]]:
  def parse(argv: list[str]) -> list[str]:
    argv = ["--help" if a == "-h" else a for a in argv]
    wants_help = any(a.split("=", 1)[0] in HELP_FLAGS for a in argv[1:])
    try:
      rest = flags.FLAGS(argv)
    except SystemExit as e:
      if wants_help and e.code in (0, 1, None):  # absl's help flags print usage, then exit 1
        sys.exit(0)
      raise
    except flags.Error as e:
      fail(prog, _flag_error_message(str(e)))
    except (AttributeError, KeyError, TypeError, ValueError, OSError) as e:  # a --config file / override
      fail(prog, _override_error_message(e, argv))
    _check_config_files(prog, argv)
    return rest
  return parse


def _check_config_files(prog: str, argv: Sequence[str]) -> None:
  """ml_collections defers a config file's load error to the first use of the flag: report it now."""
  for name, flag in flags.FLAGS._flags().items():  # pylint: disable=protected-access
    if type(flag).__name__ != "_ConfigFlag" or name != flag.name:
      continue
    try:
      value = flag.value
      if value is not None:
        value.get  # pylint: disable=pointless-statement  (the deferred error raises on attribute access)
    except Exception as e:  # pylint: disable=broad-except  (whatever the config file raised)
      lines = [l.strip() for l in str(e).splitlines() if l.strip()]
      given = [a for a in argv if re.match(rf"^--?{name}(=|$)", a)]
      fail(prog, f"{given[-1] if given else '--' + name}: cannot load the config file: "
           f"{lines[-1] if lines else type(e).__name__}")


def run(main: Callable[[list[str]], int | None], prog: str, log_level: int | None = None) -> None:
  """`absl.app.run(main)` with the conventions of the module docstring. log_level: absl's verbosity
  unless --verbosity is given (orbax logs every restore and save at INFO, read-only mode at WARNING)."""
  quiet_jax_startup()

  def wrapped(argv: list[str]):
    if log_level is not None and not flags.FLAGS["verbosity"].present:
      absl_logging.set_verbosity(log_level)
    try:
      return main(argv)
    except app.UsageError as e:
      fail(prog, str(e))
    except UserError as e:
      fail(prog, str(e), e.exit_code)

  app.run(wrapped, flags_parser=_parser(prog))
