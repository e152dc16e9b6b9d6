"""The commands' shared prologue, and one way for them to fail: a user-caused error is one
paragraph, no traceback.

  if __name__ == "__main__":
    define_flags()
    cli.run(main, required=("model", "out"))

User-caused errors are ValueError (bad config, mismatched checkpoint, bad record) and OSError
(missing file, bad path); they print `ERROR: <message>` on stderr and exit with status 1.
`--debug` re-raises them with the full traceback. Anything else is a bug and keeps its traceback.
"""

import re
import sys

from absl import app, flags, logging

USER_ERRORS = (ValueError, OSError)


def format_error(e) -> str:
  """An exception (or a message) as one `ERROR: ...` paragraph."""
  msg = " ".join(str(e).split()) or type(e).__name__    # one paragraph, however it was wrapped
  return f"ERROR: {msg} (rerun with --debug for the traceback)"


def guard(main):
  """main(argv) with user errors turned into a one-paragraph message and exit status 1."""
  def wrapped(argv):
    try:
      return main(argv)
    except USER_ERRORS as e:
      if flags.FLAGS.debug:
        raise
      print(format_error(e), file=sys.stderr, flush=True)
      sys.exit(1)
  return wrapped


def parse_flags(argv, flag_values=flags.FLAGS):
  """absl flag parsing where a bad config argument or an unknown `--config.x` override (errors
  raised inside ml_collections, with its traceback in the text) is one paragraph too."""
  try:
    return flag_values(argv)
  except (flags.Error, AttributeError, KeyError, ValueError) as e:
    if "--debug" in argv:
      raise
    lines = [x.strip() for x in str(e).strip().splitlines() if x.strip()] or [type(e).__name__]
    unknown = re.findall(r"Unknown command line flag 'config\.([\w.]+)'", str(e))
    if unknown or isinstance(e, (AttributeError, KeyError)):      # no such config field
      key = unknown[0].split(".")[-1] if unknown else (re.findall(r"'(\w+)", str(e)) or [lines[-1]])[0]
      hint = re.findall(r'Did you mean "(\w+)"', str(e))
      culprit = [a.split("=")[0] for a in argv if a.startswith("--config.")
                 and key in a.split("=")[0].split(".")]
      msg = (f"unknown config field {key!r}" + (f" in {culprit[0]}" if culprit else "") +
             (f" (did you mean {hint[0]!r}?)" if hint else "") +
             "; every field and its default is in apollo_jax/config.py (base_config)")
    else:
      msg = lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1]}"
    print(format_error(msg), file=sys.stderr, flush=True)
    sys.exit(1)


def run(main, required=()):
  """absl app.run(main) with the prologue every command shares: no positional arguments, every
  flag in `required` set, Orbax's per-save INFO logs hidden unless --verbosity is given; plus the
  --debug flag and the user-error guard."""
  flags.DEFINE_bool("debug", False, "show the full traceback of user errors (bad config, missing file)")

  def prologue(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    missing = [f"--{name}" for name in required if flags.FLAGS[name].value in (None, "")]
    if missing:
      raise app.UsageError(f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} required "
                           "(--help lists every flag)")
    if not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)
    return main(argv)

  app.run(guard(prologue), flags_parser=parse_flags)
