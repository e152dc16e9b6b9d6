"""Export a model to a stock-transformers HF dir (no trust_remote_code):

  python -m apollo_jax.convert_to_hf --model=runs/tiny --out=export/tiny [--dtype=bfloat16|float32]
      [--max_shard_size=5GB] [--step=N] [--tokenizer=PATH] [--force_topk] [--client=transformers|vllm]

--model is anything `apollo_jax.inference.load` reads: a training workdir (latest complete
checkpoint, or --step), a convert_from_hf output dir, or an HF dir. Writes safetensors (sharded
with an index above --max_shard_size), config.json, generation_config.json, tokenizer files with
the chat template, and a README.md model card. See apollo_jax/hf/export.py for the format and
for why --client exists (transformers and vLLM want different tensors for a model without a
shared expert).
"""

from absl import flags


def define_flags():
  """CLI flags; defined only when run as a script, so importing this module never clashes."""
  flags.DEFINE_string("model", None, "Training workdir, convert_from_hf dir or HF dir.")
  flags.DEFINE_string("out", None, "Output HF dir.")
  flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Weight dtype on disk.")
  flags.DEFINE_string("max_shard_size", "5GB", "Largest safetensors file, e.g. 5GB, 500MB.")
  flags.DEFINE_integer("step", None, "Workdir checkpoint step (default: the latest complete one).")
  flags.DEFINE_string("tokenizer", None, "Tokenizer to ship (default: the model's own).")
  flags.DEFINE_bool("force_topk", False, "Export routing='language' models anyway (HF routes by top-k).")
  from apollo_jax.hf.export import CLIENT_HELP, CLIENTS
  flags.DEFINE_enum("client", "transformers", list(CLIENTS), "Which loader the files are for. " + CLIENT_HELP)


def convert(model, out, dtype="bfloat16", max_shard_size="5GB", step=None, tokenizer=None, force_topk=False,
            client="transformers"):
  """Returns the list of files written to `out`."""
  import os
  from apollo_jax import inference
  from apollo_jax.hf import export as hf_export
  hf_export.parse_size(max_shard_size)        # fail on bad flags before loading anything
  hf_export.check_client(client)
  if os.path.exists(out) and os.listdir(out):
    raise FileExistsError(f"--out={out} exists and is not empty; choose a new directory")
  lm = inference.load(model, step=step, tokenizer=tokenizer)
  hf_export.check_exportable(lm.config, force_topk)
  if lm.tokenizer is None:
    print(f"warning: {model} has no tokenizer; exporting weights and config only (pass --tokenizer)")
  return hf_export.export(lm, out, dtype, max_shard_size, force_topk, client)


def main(argv):
  del argv
  f = flags.FLAGS
  files = convert(f.model, f.out, f.dtype, f.max_shard_size, f.step, f.tokenizer, f.force_topk, f.client)
  print(f"wrote {f.out}: {', '.join(files)}")


if __name__ == "__main__":
  define_flags()
  from apollo_jax.runtime import cli
  cli.run(main, required=("model", "out"))
