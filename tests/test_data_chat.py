"""Chat template and label masking (docs/original.md, Chat format and labels), tokenizers
(sentencepiece and HF tokenizer.json)."""

import os

import numpy as np
import pytest

import data_fixtures as F
from apollo_jax.data import chat, tokenizer

VOCAB = {"<pad>": 0, "<unk>": 1, "<s>": 2, "<|endoftext|>": 3, "\n": 4, "User:": 5, "Assistant:": 6,
         "hi": 7, "hello": 8, "fever": 9, "?": 10, "rest": 11, ".": 12}


def word_level_json(path, vocab=VOCAB):
  """A tiny HF WordLevel tokenizer whose pieces we know by heart."""
  import tokenizers
  from tokenizers import models, pre_tokenizers
  tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Split(tokenizers.Regex(r"\n|User:|Assistant:|\w+|[^\w\s]"), "isolated")
  tok.add_special_tokens([t for t in ("<|endoftext|>", "<pad>") if t in vocab])
  tok.save(str(path))
  return str(path)


def test_two_turn_pairs_exact_ids_targets_mask(tmp_path):
  tok = tokenizer.load_tokenizer(word_level_json(tmp_path / "tokenizer.json"))
  assert isinstance(tok, tokenizer.HFTokenizer) and tok.eos_id == 3 and tok.vocab_size == 13
  # Pieces tokenised separately: "User:hi?" | "\nAssistant:" | "hello." | "\nUser:fever?" | "\nAssistant:" |
  # "rest." | EOS
  ids, labels = chat.ChatEncoder(tok)(["hi?", "hello.", "fever?", "rest."])
  assert ids.tolist() == [5, 7, 10, 4, 6, 8, 12, 4, 5, 9, 10, 4, 6, 11, 12, 3]
  I = chat.IGNORE
  # answers + final EOS are labels; the first token of the 2nd user turn is labelled EOS (as the original)
  assert labels.tolist() == [I, I, I, I, I, 8, 12, 3, I, I, I, I, I, 11, 12, 3]
  targets, mask = chat.shift(ids, labels, pad_id=0)
  assert targets.tolist() == [7, 10, 4, 6, 8, 12, 3, 5, 9, 10, 4, 6, 11, 12, 3, 0]
  assert mask.tolist() == [0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 1, 1, 1, 0]


def test_hf_tokenizer_eos_choice(tmp_path):
  vocab = {k: v for k, v in VOCAB.items() if k != "<|endoftext|>"}
  vocab["</s>"] = 13
  path = word_level_json(tmp_path / "tokenizer.json", vocab)
  with pytest.raises(ValueError, match="data.eos_token"):
    tokenizer.load_tokenizer(path)
  tok = tokenizer.load_tokenizer(path, eos_token="</s>")
  assert tok.eos_id == 13 and tok.pad_id == 0
  assert tokenizer.load_tokenizer(str(tmp_path), eos_token="</s>").eos_id == 13      # HF checkpoint dir
  with pytest.raises(ValueError, match="unknown kind"):
    tokenizer.load_tokenizer(F.write_json(tmp_path / "x.vocab", {}))


def test_sentencepiece_template_boundaries(tmp_path):
  convs = F.make_conversations(0)
  tok = tokenizer.load_tokenizer(F.train_tiny_tokenizer(tmp_path / "t.model", convs))
  assert (tok.pad_id, tok.eos_id) == (0, 3) and tok.vocab_size <= 600
  enc = chat.ChatEncoder(tok)
  turns = convs["medicalBook_en_qa"][0] + ["Why fever?", "Rest and water."]
  ids, labels = enc(turns)
  # decoding the separately tokenised pieces gives exactly the template text (no spaces added)
  assert tok.decode(ids) == chat.template_text(turns, eos_text="")
  assert ids[-1] == tok.eos_id
  # each trained span = one answer (never a piece of "Assistant:") + one EOS-labelled position:
  # the last token, or the "\n" that opens the next user turn (as the original)
  trained = np.flatnonzero(labels != chat.IGNORE)
  spans = np.split(trained, np.flatnonzero(np.diff(trained) > 1) + 1)
  answers = turns[1::2]
  assert len(spans) == len(answers) == 3
  for span, ans in zip(spans, answers):
    assert tok.decode(ids[span[:-1]]) == ans
    assert (labels[span[:-1]] == ids[span[:-1]]).all() and labels[span[-1]] == tok.eos_id
    assert tok.decode(ids[span[0] - 1:span[0]]) == "Assistant:"
  assert spans[-1][-1] == len(ids) - 1
  for span in spans[:-1]:
    assert tok.decode([ids[span[-1]]]) == "\n"


def test_shift_never_predicts_across_sample_end():
  ids = np.array([5, 6, 7], np.int32)
  labels = np.array([chat.IGNORE, 6, 7], np.int32)
  targets, mask = chat.shift(ids, labels, pad_id=9)
  assert targets.tolist() == [6, 7, 9] and mask.tolist() == [1, 1, 0]
  t, m = chat.shift(ids[:1], labels[:1])
  assert t.tolist() == [0] and m.tolist() == [0]


def test_tokenizers_pickle(tmp_path):
  import pickle
  sp = tokenizer.load_tokenizer(F.train_tiny_tokenizer(tmp_path / "t.model", F.make_conversations(0)))
  hf = tokenizer.load_tokenizer(word_level_json(tmp_path / "tokenizer.json"))
  for tok in (sp, hf):
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode("User:hi?") == tok.encode("User:hi?") and clone.eos_id == tok.eos_id


@pytest.mark.parametrize("name,contents", [("cut.model", None), ("cut.json", b'{"model": ')])
def test_a_truncated_tokenizer_file_is_a_clear_error(tmp_path, name, contents):
  src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data/sample/tokenizer.model")
  path = tmp_path / name
  path.write_bytes(contents if contents is not None else open(src, "rb").read()[:100])
  with pytest.raises(ValueError, match=f"tokenizer '{path}' cannot be read .*truncated or not a tokenizer file"):
    tokenizer.load_tokenizer(str(path))
