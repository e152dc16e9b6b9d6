"""One way for the command-line tools to fail: a user-caused error is one paragraph, no traceback.

  if __name__ == "__main__":
    define_flags()
    cli.run(main)

User-caused errors are ValueError (bad config, mismatched checkpoint, bad record) and OSError
(missing file, bad path); they print `ERROR: <message>` on stderr and exit with status 1.
`--debug` re-raises them with the full traceback. Anything else is a bug and keeps its traceback.
"""

import sys

from absl import app, flags

USER_ERRORS = (ValueError, OSError)


def format_error(e: BaseException) -> str:
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


def run(main):
  """absl app.run(main) plus the --debug flag and the user-error guard."""
  flags.DEFINE_bool("debug", False, "show the full traceback of user errors (bad config, missing file)")
  app.run(guard(main))
