"""Export to one GGUF file for llama.cpp / Ollama (no llama.cpp needed to export):

  python -m apollo_jax.convert_to_gguf --model=runs/tiny --out=tiny.gguf [--dtype=f32|f16|bf16|q8_0]
      [--step=N] [--tokenizer=PATH] [--force_topk]

--model is anything `apollo_jax.inference.load` reads (a training workdir, a convert_from_hf dir,
an HF dir). MoE layers must be a trailing block (moe.layers 'last:N', 'all' or 'none'). See
apollo_jax/hf/gguf_export.py for the representation (llama.cpp's DeepSeek-MoE architecture) and
apollo_jax/hf/gguf_vocab.py for the tokenizer.
"""

from absl import flags


def define_flags():
  """CLI flags; defined only when run as a script, so importing this module never clashes."""
  flags.DEFINE_string("model", None, "Training workdir, convert_from_hf dir or HF dir.")
  flags.DEFINE_string("out", None, "Output .gguf file.")
  flags.DEFINE_enum("dtype", "f32", ["f32", "f16", "bf16", "q8_0"],
                    "Matrix dtype (norms, biases and the router stay f32).")
  flags.DEFINE_integer("step", None, "Workdir checkpoint step (default: the latest complete one).")
  flags.DEFINE_string("tokenizer", None, "Tokenizer to embed (default: the model's own).")
  flags.DEFINE_bool("force_topk", False, "Export routing='language' models anyway (llama.cpp routes by top-k).")


def convert(model, out, dtype="f32", step=None, tokenizer=None, force_topk=False):
  """Writes `out`; returns its number of tensors."""
  import os
  from apollo_jax import inference
  from apollo_jax.hf import gguf_export
  if dtype not in gguf_export.DTYPES:
    raise ValueError(f"--dtype={dtype!r}; choose one of {', '.join(gguf_export.DTYPES)}")
  if os.path.exists(out):
    raise FileExistsError(f"--out={out} exists; choose a new file name")
  lm = inference.load(model, step=step, tokenizer=tokenizer)
  return gguf_export.export(lm, out, dtype, force_topk)


def main(argv):
  del argv
  f = flags.FLAGS
  n = convert(f.model, f.out, f.dtype, f.step, f.tokenizer, f.force_topk)
  print(f"wrote {f.out}: {n} tensors, {f.dtype}")


if __name__ == "__main__":
  define_flags()
  from apollo_jax.runtime import cli
  cli.run(main, required=("model", "out"))
