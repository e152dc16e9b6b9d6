"""Train a sentencepiece BPE tokenizer on the user and assistant texts of ApolloMoEDataset files.

  python -m apollo_jax.data.train_tokenizer --files=data/sample/apollo_moe_sample.json \
      --out=data/sample/tokenizer.model --vocab_size=4096

Choices (why):
  * BPE with byte_fallback: no <unk> for any of the 50 languages' scripts (rare characters become
    byte pieces); character_coverage 0.9995 (the usual value for CJK-heavy corpora) keeps the
    required-character set small enough for a 4k vocabulary across Latin, Cyrillic, Arabic,
    Devanagari, Thai, Lao, Hangul and CJK text (at 1.0 the required characters can exceed a small vocab);
  * ids pad=0, unk=1, bos=2, eos=3 (EOS ends every answer, chat.py);
  * identity normalisation, no dummy prefix, whitespace kept: the chat template tokenises its
    pieces separately, and decode(encode(a) + encode(b)) must equal a + b exactly;
  * "\n", "User:" and "Assistant:" are single pieces, so the template is compact and stable.
The vocabulary may come out smaller than requested on a tiny corpus (hard_vocab_limit=False).
"""

import argparse
import io
import logging

from apollo_jax.data import records

SPECIALS = ["\n", "User:", "Assistant:"]


def corpus_lines(samples):
  """Non-empty lines of every turn (user and assistant) of the samples."""
  for s in samples:
    for turn in s.turns:
      for line in turn.split("\n"):
        if line.strip():
          yield line


def train_sentencepiece(lines, out=None, vocab_size=4096, character_coverage=0.9995, seed_sentences=2_000_000):
  """Train on an iterable of lines; returns the model proto bytes (also written to `out`)."""
  import sentencepiece as spm
  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
      character_coverage=character_coverage, byte_fallback=True, pad_id=0, unk_id=1, bos_id=2, eos_id=3,
      normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
      allow_whitespace_only_pieces=True, split_digits=True, user_defined_symbols=SPECIALS,
      hard_vocab_limit=False, max_sentence_length=1 << 16, input_sentence_size=seed_sentences,
      shuffle_input_sentence=True, num_threads=2, minloglevel=2)
  proto = buf.getvalue()
  if out:
    with open(out, "wb") as f:
      f.write(proto)
  return proto


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--files", required=True, help="dataset file(s): path, glob or comma-separated list")
  p.add_argument("--out", required=True, help="output .model path")
  p.add_argument("--vocab_size", type=int, default=4096)
  p.add_argument("--character_coverage", type=float, default=0.9995)
  p.add_argument("--skip_bad_records", action="store_true")
  a = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO)
  samples, _ = records.read_dataset(a.files, a.skip_bad_records)
  train_sentencepiece(corpus_lines(samples), a.out, a.vocab_size, a.character_coverage)
  import sentencepiece as spm
  sp = spm.SentencePieceProcessor(model_file=a.out)
  print(f"wrote {a.out}: vocab {sp.get_piece_size()} from {len(samples)} conversations")


if __name__ == "__main__":
  main()
