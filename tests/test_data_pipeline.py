"""make_data end to end on fixture files: format, languages, determinism, resume, process shares,
held-out split, both file forms, rebuilds, HF tokenizer.json, bad records."""

import collections
import json
import logging
import re
import shutil
import types

import numpy as np
import pytest

import data_fixtures as F
from apollo_jax import languages
from apollo_jax.data import chat, mixture, packing, pipeline


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  root = tmp_path_factory.mktemp("data")
  lst, ext, tok, convs = F.setup(root)
  return types.SimpleNamespace(root=root, lst=lst, ext=ext, tok=tok, convs=convs, cache=str(root / "cache"))


def take(it, n):
  return [next(it) for _ in range(n)]


def equal(a, b):
  return len(a) == len(b) and all(all(np.array_equal(x[k], y[k]) for k in packing.KEYS) for x, y in zip(a, b))


def segments(batch):
  """(row, segment id, token indices) of every packed sample."""
  for r, seg in enumerate(batch["segment_ids"]):
    for s in np.unique(seg[seg > 0]):
      yield r, s, np.flatnonzero(seg == s)


def texts(batches, tok):
  return [tok.decode(b["input_ids"][r, idx]) for b in batches for r, _, idx in segments(b)]


def full_text(turns):
  return chat.template_text(turns, eos_text="")


def test_batch_format_and_languages(env):
  c = F.tiny_config(env.lst, env.tok, seq_len=512)
  data = pipeline.make_data(c, env.cache)
  s = data.stats
  assert (s["train_samples"], s["eval_samples"], s["bad_records_skipped"], s["truncated_samples"]) == (52, 6, 0, 0)
  assert s["tokenizer_vocab"] == data.tokenizer.vocab_size <= c.model.vocab_size
  batches = take(data.train_iter, 3)
  for b in batches:
    assert set(b) == set(packing.KEYS)
    assert all(v.shape == (4, 512) and v.dtype == np.int32 for v in b.values())
    pad = b["segment_ids"] == 0
    assert (b["loss_mask"][pad] == 0).all() and (b["input_ids"][pad] == data.tokenizer.pad_id).all()
    assert (b["language_ids"][pad] == 0).all()
    for r, _, idx in segments(b):
      lang = b["language_ids"][r, idx]
      assert (lang == lang[0]).all()                  # every token carries its sample's language
      assert (b["positions"][r, idx] == np.arange(len(idx))).all()
      assert b["loss_mask"][r, idx[-1]] == 0
      words = set(re.findall(r"\w+", data.tokenizer.decode(b["input_ids"][r, idx]))) - {"User", "Assistant"}
      assert words <= set(F.WORDS[languages.CODES[lang[0]]]), (languages.CODES[lang[0]], words)
  ev = list(data.eval_batches())
  assert 1 <= len(ev) <= c.eval_batches and equal(ev, list(data.eval_batches()))
  assert all(v.shape == (4, 512) for b in ev for v in b.values())


def test_same_seed_same_batches_and_resume(env):
  c = F.tiny_config(env.lst, env.tok)
  a = take(pipeline.make_data(c, env.cache).train_iter, 5)
  d = pipeline.make_data(c, env.cache)
  assert equal(a, take(d.train_iter, 5))
  c2 = F.tiny_config(env.lst, env.tok, order_seed=1)
  assert not equal(a, take(pipeline.make_data(c2, env.cache).train_iter, 5))
  # resume across an epoch boundary (about 18 steps per epoch here)
  take(d.train_iter, 11)
  state = json.loads(json.dumps(d.train_iter.get_state()))
  following = take(d.train_iter, 5)
  fresh = pipeline.make_data(c, env.cache)
  fresh.train_iter.set_state(state)
  assert equal(following, take(fresh.train_iter, 5))
  assert not equal(following, a)


def test_process_shares_disjoint_and_covering(env):
  c = F.tiny_config(env.lst, env.tok)
  whole = take(pipeline.make_data(c, env.cache).train_iter, 22)
  parts = [take(pipeline.make_data(c, env.cache, p, 2).train_iter, 22) for p in range(2)]
  for w, p0, p1 in zip(whole, *parts):
    assert p0["input_ids"].shape == (2, 64)
    joined = {k: np.concatenate([p0[k], p1[k]]) for k in packing.KEYS}
    assert equal([w], [joined])
  ev = [list(pipeline.make_data(c, env.cache, p, 2).eval_batches()) for p in range(2)]
  ew = list(pipeline.make_data(c, env.cache).eval_batches())
  assert equal(ew, [{k: np.concatenate([x[k], y[k]]) for k in packing.KEYS} for x, y in zip(*ev)])
  with pytest.raises(ValueError, match="divisible"):
    pipeline.make_data(c, env.cache, 0, 3)


def test_both_file_forms_same_batches(env):
  a = pipeline.make_data(F.tiny_config(env.lst, env.tok), env.cache)
  b = pipeline.make_data(F.tiny_config(env.ext, env.tok), env.cache)
  assert a.stats == b.stats
  assert equal(take(a.train_iter, 6), take(b.train_iter, 6))
  assert equal(list(a.eval_batches()), list(b.eval_batches()))


def test_epoch_contents_repeats_and_heldout_split(env):
  c = F.tiny_config(env.lst, env.tok, seq_len=512, eval_fraction=0.2, eval_batches=0)
  data = pipeline.make_data(c, env.cache)
  tok, s = data.tokenizer, data.stats
  rows_needed = 2 * s["rows_per_epoch"]
  batches = take(data.train_iter, -(-rows_needed // c.global_batch))
  rows = [{k: b[k][r:r + 1] for k in packing.KEYS} for b in batches for r in range(c.global_batch)]
  epoch0 = texts(rows[:s["rows_per_epoch"]], tok)
  heldout = texts(list(data.eval_batches()), tok)
  assert len(heldout) == s["eval_samples"] == round(0.2 * 58) and len(set(heldout)) == len(heldout)
  assert not set(heldout) & set(epoch0)
  # every training record appears `repeat` times per epoch (data/mixture.py), eval records never
  expected = collections.Counter()
  for source, items in env.convs.items():
    for turns in items:
      if full_text(turns) not in heldout:
        expected[full_text(turns)] += mixture.default_priority(source)[1]
  assert collections.Counter(epoch0) == expected
  epoch1 = texts(rows[s["rows_per_epoch"]:rows_needed], tok)
  assert collections.Counter(epoch1[:len(epoch0) - 5]) != collections.Counter(epoch0[:len(epoch0) - 5])
  assert set(heldout) == set(texts(list(pipeline.make_data(c, env.cache).eval_batches()), tok))
  train, held = pipeline.split_eval(58, 0.2, 3407)
  assert len(held) == 12 and not set(train) & set(held) and len(train) + len(held) == 58
  assert not np.array_equal(held, pipeline.split_eval(58, 0.2, 1)[1])


def test_eval_files_and_rebuild_on_change(env, tmp_path):
  other = F.write_json(tmp_path / "eval.json", F.make_conversations(7, sources=[("general_de", 5)]))
  data = pipeline.make_data(F.tiny_config(env.lst, env.tok, eval_files=other), env.cache)
  assert (data.stats["train_samples"], data.stats["eval_samples"]) == (58, 5)
  texts_ev = texts(list(data.eval_batches()), data.tokenizer)
  assert all(t.startswith("User:") for t in texts_ev) and len(texts_ev) >= 1
  path = str(shutil.copy(env.lst, tmp_path / "train.json"))
  items = json.load(open(path))
  before = pipeline.make_data(F.tiny_config(path, env.tok), env.cache).stats
  json.dump(items + items[:2], open(path, "w"))
  after = pipeline.make_data(F.tiny_config(path, env.tok), env.cache).stats
  assert before["train_samples"] + before["eval_samples"] + 2 == after["train_samples"] + after["eval_samples"]


def test_causal_packing_end_to_end(env):
  data = pipeline.make_data(F.tiny_config(env.lst, env.tok, packing="causal"), env.cache)
  ref = pipeline.make_data(F.tiny_config(env.lst, env.tok), env.cache)
  for b, r in zip(take(data.train_iter, 3), take(ref.train_iter, 3)):
    assert set(np.unique(b["segment_ids"])) <= {0, 1}
    assert (b["positions"] == np.arange(64)).all()
    for k in ("input_ids", "targets", "loss_mask", "language_ids"):
      assert np.array_equal(b[k], r[k])         # same rows; only attention/positions differ
    assert np.array_equal(b["segment_ids"] > 0, r["segment_ids"] > 0)


def test_hf_tokenizer_json_end_to_end(env, tmp_path):
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, trainers
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  lines = [t for items in env.convs.values() for turns in items for t in turns] + ["User:", "\nAssistant:"]
  tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok.save(str(tmp_path / "tokenizer.json"))
  c = F.tiny_config(env.lst, str(tmp_path / "tokenizer.json"), seq_len=512)
  data = pipeline.make_data(c, env.cache)
  assert data.tokenizer.eos_id == 0 == data.tokenizer.pad_id
  known = {full_text(t) for items in env.convs.values() for t in items}
  b = next(data.train_iter)
  for r, _, idx in segments(b):
    assert b["input_ids"][r, idx[-1]] == 0
    assert data.tokenizer.decode(b["input_ids"][r, idx[:-1]]) in known


def test_bad_records_through_make_data(env, tmp_path, caplog):
  items = F.to_list_form(F.make_conversations(0))
  items[3]["source"] = "general_zz"
  items[5]["conversations"] = []
  items[8]["conversations"][0]["value"] = None
  path = F.write_json(tmp_path / "bad.json", items)
  with pytest.raises(ValueError, match=r"bad.json: record 3 \(source 'general_zz'\)"):
    pipeline.make_data(F.tiny_config(path, env.tok), env.cache)
  with caplog.at_level(logging.WARNING):
    data = pipeline.make_data(F.tiny_config(path, env.tok, skip_bad_records=True), env.cache)
  assert data.stats["bad_records_skipped"] == 3 and "skipped 3 bad records" in caplog.text
  assert data.stats["train_samples"] + data.stats["eval_samples"] == 55
  caplog.clear()
  with caplog.at_level(logging.WARNING):      # cached build: still reported
    again = pipeline.make_data(F.tiny_config(path, env.tok, skip_bad_records=True), env.cache)
  assert again.stats["bad_records_skipped"] == 3 and "skipped 3 bad records" in caplog.text


def test_vocab_check(env):
  c = F.tiny_config(env.lst, env.tok)
  c.model.vocab_size = 100
  with pytest.raises(ValueError, match="model.vocab_size"):
    pipeline.make_data(c, env.cache)


def test_orbax_saves_and_restores_iterator(env, tmp_path):
  import grain
  import orbax.checkpoint as ocp
  c = F.tiny_config(env.lst, env.tok)
  data = pipeline.make_data(c, env.cache)
  take(data.train_iter, 3)
  with ocp.CheckpointManager(str(tmp_path / "ckpt")) as mgr:
    mgr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(data.train_iter)))
    mgr.wait_until_finished()
    expect = take(data.train_iter, 3)
    fresh = pipeline.make_data(c, env.cache)
    mgr.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh.train_iter)))
  assert equal(expect, take(fresh.train_iter, 3))
