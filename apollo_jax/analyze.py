"""Routing analysis of a trained model: `python -m apollo_jax.analyze --model=PATH --data=FILES
--out=DIR [--group=language|family]`.

PATH is anything `inference.load` accepts. FILES (path, glob or comma list) are ApolloMoEDataset
conversations (list or extracted form, tokenised in the training chat format) or ApolloMoEBench
records (zero-shot prompt "User:{question}\\n{options}\\nAssistant:"). Inference-mode forward passes
(train=False: plain top-k for every routing mode except `language`) sow each real token's chosen
experts; apollo_jax.analysis counts them per MoE layer, per language and per family (padding is
never counted). Writes DIR/routing.json (both groupings; definitions inside) and PNG heatmaps for
--group: heatmaps/<group>_<name>.png (layers x experts), heatmap_average.png and
dominant_<group>.png (layers x groups: share of the group's tokens on its most-used expert).
"""

import os

from absl import flags

from apollo_jax import inference
from apollo_jax.analysis import routing, routing_stats
from apollo_jax.runtime import cli


def define_flags():
  flags.DEFINE_string("model", None, "model to analyse (anything inference.load accepts)")
  flags.DEFINE_string("data", "data/sample/apollo_moe_sample.json",
                      "conversation (ApolloMoEDataset) or benchmark (ApolloMoEBench) files: path, glob or list")
  flags.DEFINE_string("out", None, "output directory for routing.json and the PNGs")
  flags.DEFINE_enum("group", "language", list(routing_stats.GROUPINGS), "grouping of the heatmaps")
  flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)")
  flags.DEFINE_integer("batch_size", 8, "sequences per forward pass")
  flags.DEFINE_integer("max_len", 0, "truncate sequences to this many tokens (0: the model's data.seq_len)")
  flags.DEFINE_integer("max_samples", 0, "analyse only the first N records (0: all)")
  flags.DEFINE_string("cache_dir", "", "where benchmark files' TFDS datasets are built once (default: OUT/data_cache)")


def main(argv):
  del argv
  F = flags.FLAGS
  lm = inference.load(F.model, step=F.step)
  if lm.tokenizer is None:
    raise ValueError(f"{F.model} has no tokenizer to encode --data with")
  max_len = F.max_len or lm.config.data.seq_len
  inputs = routing.read_inputs(F.data, lm.tokenizer, max_len, F.max_samples,
                               F.cache_dir or os.path.join(F.out, "data_cache"))
  result = routing.analyze(lm, inputs, F.batch_size, max_len)
  result.update(model=os.path.abspath(F.model), data=F.data)
  paths = routing.write(result, F.out, F.group)
  spec = " ".join(f"{s:.2f}" for s in result[F.group]["specialization"])
  print(f"{result['tokens']} tokens of {result['sequences']} sequences; specialization by {F.group} "
        f"per MoE layer {result['moe_layers']}: {spec}\nwrote {len(paths)} files under {F.out}")


if __name__ == "__main__":
  define_flags()
  cli.run(main, required=("model", "out"))
