"""Training curves of a workdir as PNGs: `python -m apollo_jax.plot --workdir=DIR [--out=DIR]`
(what is drawn: apollo_jax/analysis/plots.py)."""

from absl import flags

from apollo_jax.analysis import plots


def define_flags():
  flags.DEFINE_string("workdir", None, "training workdir holding metrics.jsonl")
  flags.DEFINE_string("out", "", "output directory (default: WORKDIR/plots)")


def main(argv):
  del argv
  paths = plots.training_curves(flags.FLAGS.workdir, flags.FLAGS.out)
  print("\n".join(paths))


if __name__ == "__main__":
  define_flags()
  from apollo_jax.runtime import cli
  cli.run(main, required=("workdir",))
