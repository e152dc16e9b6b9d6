"""Shared fixture builders for the data tests: small multilingual dataset files in both upstream
forms and a tiny sentencepiece model trained in-process (no shipped sample, no download)."""

import json
import os

import numpy as np

WORDS = {
    "en": "the patient has fever and cough please drink water rest see doctor blood pressure heart".split(),
    "zh": "病人 发烧 咳嗽 请 多 喝水 休息 医生 血压 心脏 治疗 药物".split(),
    "fr": "le patient a de la fièvre et une toux buvez eau repos médecin tension cœur".split(),
    "de": "der Patient hat Fieber und Husten trinken Wasser Ruhe Arzt Blutdruck Herz".split(),
    "ckb": "نەخۆش تا و کۆکە ئاو بخۆوە پشوو بدە پزیشک".split(),
    "sw": "mgonjwa ana homa na kikohozi kunywa maji pumzika daktari moyo".split(),
}
# (source key, number of conversations); priorities: *_qa 16, others 2 (data/mixture.py)
SOURCES = [("medicalBook_en_qa", 14), ("medicalWiki_zh_qa", 10), ("medicalGuideline_fr_qa", 8),
           ("medicalExam_de", 8), ("general_en", 6), ("general_ckb", 6), ("medicalExam_sw", 6)]


def make_conversations(seed=0, sources=SOURCES, max_words=25):
  """{source: [[q, a, (q, a)...], ...]} with deterministic random text."""
  rng = np.random.default_rng(seed)
  out = {}
  for source, n in sources:
    words = WORDS[source.split("_")[1]]
    convs = []
    for _ in range(n):
      turns = []
      for _ in range(2 * int(rng.integers(1, 3))):
        k = int(rng.integers(1, max_words))
        turns.append(" ".join(rng.choice(words, size=k)) + ("?" if len(turns) % 2 == 0 else "."))
      convs.append(turns)
    out[source] = convs
  return out


def to_list_form(convs):
  """Extracted form -> list form (items grouped by source, in the same order)."""
  roles = ("human", "gpt")
  return [{"conversations": [{"from": roles[j % 2], "value": t} for j, t in enumerate(turns)],
           "source": source, "class": "minor" if source.split("_")[1] in ("ckb", "sw") else "major"}
          for source, items in convs.items() for turns in items]


def write_json(path, obj):
  with open(path, "w", encoding="utf-8") as f:
    json.dump(obj, f, ensure_ascii=False, indent=1)
  return str(path)


def train_tiny_tokenizer(path, convs, vocab_size=600):
  from apollo_jax.data import records, train_tokenizer
  samples = [records.Sample(s, 0, tuple(t)) for s, items in convs.items() for t in items]
  train_tokenizer.train_sentencepiece(train_tokenizer.corpus_lines(samples), str(path), vocab_size)
  return str(path)


def tiny_config(train_files, tokenizer, **data):
  from configs import tiny
  c = tiny.get_config()
  c.data.train_files = train_files
  c.data.tokenizer = tokenizer
  c.data.seq_len = 64
  c.global_batch = 4
  c.eval_batches = 2
  c.data.eval_fraction = 0.1
  for k, v in data.items():
    if k in ("global_batch", "eval_batches"):
      c[k] = v
    else:
      c.data[k] = v
  return c


def setup(tmp_path, seed=0):
  """(list-form path, extracted-form path, tokenizer path, conversations) under tmp_path."""
  convs = make_conversations(seed)
  os.makedirs(tmp_path, exist_ok=True)
  lst = write_json(os.path.join(tmp_path, "data_list.json"), to_list_form(convs))
  ext = write_json(os.path.join(tmp_path, "data_extracted.json"), convs)
  tok = train_tiny_tokenizer(os.path.join(tmp_path, "tok.model"), convs)
  return lst, ext, tok, convs
