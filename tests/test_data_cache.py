"""Data at real size: streaming JSON parse with bounded memory, the pre-tokenised cache
(same batches as per-step tokenisation, parallel and concurrent builds, remote cache dirs),
odd-length conversations, epochs, and an empty eval split."""

import hashlib
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import textwrap
import tracemalloc
import types

import numpy as np
import pytest

import data_fixtures as F
from apollo_jax.data import chat, packing, pipeline, records, stream_json, tfds_builders, token_cache
from apollo_jax.data import tokenizer as tok_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  root = tmp_path_factory.mktemp("cache")
  lst, ext, tok, convs = F.setup(root)
  return types.SimpleNamespace(root=root, lst=lst, ext=ext, tok=tok, convs=convs,
                               tokenizer=tok_lib.load_tokenizer(tok))


def digest(batches):
  h = hashlib.sha256()
  for b in batches:
    for k in packing.KEYS:
      h.update(np.ascontiguousarray(b[k], np.int32).tobytes())
  return h.hexdigest()[:24]


# Captured with the per-step tokenising loader (commit de62a88) on data/sample, configs/tiny.py with
# seq_len=128, global_batch=4: 125 train batches (crossing into epoch 1) and all eval batches.
GOLDEN = {"segment": ("7e69299762685e3f44e17f32", "1e5059329cc4ad8ddd5807d8"),
          "causal": ("55486b09c94f78201fbf8bb5", "06ea5d90c713695ad91c0092")}


@pytest.mark.parametrize("mode", sorted(GOLDEN))
def test_pretokenised_batches_equal_per_step_tokenisation(tmp_path, mode):
  from configs import tiny
  c = tiny.get_config()
  c.data.train_files = os.path.join(ROOT, c.data.train_files)
  c.data.tokenizer = os.path.join(ROOT, c.data.tokenizer)
  c.data.packing, c.data.seq_len, c.global_batch, c.eval_batches = mode, 128, 4, 0
  data = pipeline.make_data(c, str(tmp_path))
  assert data.stats["rows_per_epoch"] == 468 and data.stats["train_samples"] == 266
  train = [next(data.train_iter) for _ in range(125)]
  assert (digest(train), digest(list(data.eval_batches()))) == GOLDEN[mode]


def test_cached_samples_equal_chat_encoder_on_the_text(env, tmp_path):
  """The old per-step path, kept here: tokenise each record's text and compare with the cache."""
  c = token_cache.open_corpus(env.ext, str(tmp_path), env.tokenizer)
  samples, _ = records.read_dataset(env.ext)
  enc = chat.ChatEncoder(env.tokenizer)
  assert len(c) == len(samples) == 58
  for i, s in enumerate(samples):
    ids, labels, lang = c.sample(i)
    want_ids, want_labels = enc(s.turns)
    assert np.array_equal(ids, want_ids) and np.array_equal(labels, want_labels) and lang == s.language
    assert c.lengths[i] == len(want_ids) and c.sources([i]) == [s.source]


def test_cache_is_a_tfds_dataset_users_can_load(env, tmp_path):
  import tensorflow_datasets as tfds
  c = token_cache.open_corpus(env.ext, str(tmp_path), env.tokenizer)
  name = "apollo_moe_tokens/" + os.path.basename(os.path.dirname(c.directory))
  by_name = tfds.data_source(name, data_dir=str(tmp_path / "tfds"))["train"]
  by_dir = tfds.builder_from_directory(c.directory).as_data_source(split="train")
  assert len(by_name) == len(by_dir) == len(c) == 58
  for i in (0, 17, 57):
    ids, labels, lang = c.sample(i)
    for x in (by_name[i], by_dir[i]):
      assert np.array_equal(x["ids"], ids) and int(x["language"]) == lang
      assert np.array_equal(x["label_kind"] == 1, (labels == ids) & (labels != chat.IGNORE))


def test_odd_length_conversations_as_the_original(env, tmp_path):
  """As the original: a conversation may end on a user turn; that turn's first token is labelled EOS
  (after the previous answer), the rest of it is not trained, and the final EOS is."""
  convs = {"general_en": [["hi there?", "hello.", "and then?"], ["only a question?"]],
           "medicalBook_en_qa": [["q?", "a."]]}
  path = F.write_json(tmp_path / "odd.json", F.to_list_form(convs))
  c = token_cache.open_corpus(path, str(tmp_path / "cache"), env.tokenizer)
  assert len(c) == 3 and c.meta["bad_records_skipped"] == 0
  tok, eos = env.tokenizer, env.tokenizer.eos_id
  ids, labels, _ = c.sample(0)
  u1, a_mark, a1, u2 = (tok.encode("User:hi there?"), tok.encode("\nAssistant:"), tok.encode("hello."),
                        tok.encode("\nUser:and then?"))
  assert ids.tolist() == u1 + a_mark + a1 + u2 + [eos]
  ign = chat.IGNORE
  assert labels.tolist() == ([ign] * (len(u1) + len(a_mark)) + a1 + [eos] + [ign] * (len(u2) - 1) + [eos])
  ids, labels, _ = c.sample(1)                      # a lone user turn: only the EOS is trained
  assert ids.tolist() == tok.encode("User:only a question?") + [eos]
  assert labels.tolist() == [ign] * (len(ids) - 1) + [eos]


def _json_error(doc):
  try:
    json.loads(doc)
  except json.JSONDecodeError as e:
    return e.lineno, e.colno
  raise AssertionError(doc)


@pytest.mark.parametrize("chunk", [3, 1 << 20])
def test_streaming_matches_json_load_and_its_error_positions(env, tmp_path, monkeypatch, chunk):
  monkeypatch.setattr(stream_json, "CHUNK", chunk)      # 3 bytes: every boundary gets split
  for path in (env.lst, env.ext):
    got = [(k, i, item) for k, i, item, _ in stream_json.iter_items(path, "{path} {got}")]
    data = json.load(open(path, encoding="utf-8"))
    want = ([(None, i, x) for i, x in enumerate(data)] if isinstance(data, list) else
            [(k, i, x) for k, v in data.items() for i, x in enumerate(v)])
    assert got == want
  lines = [line for *_, line in stream_json.iter_items(env.lst, "")]
  text = open(env.lst, encoding="utf-8").read().splitlines()
  assert lines == [k + 1 for k, line in enumerate(text) if line == " {"]     # json.dump(indent=1)
  bad = ['[1, 2,, 3]', '{"a": [1], "b" [2]}', '[{"x": tru}]', '[{"a": "b"', '[] x', '{1: []}',
         '[\n {"a": 1},\n {"a": 2}\n {"a": 3}]', '{"k": [[1,2],\n [3,4]],\n "j": [[5]] "x"}',
         '{"k": 5, "j": [[5], 7 8]}']
  for k, doc in enumerate(bad):
    p = tmp_path / f"bad{k}.json"
    p.write_text(doc)
    line, col = _json_error(doc)
    with pytest.raises(ValueError, match=f"bad{k}.json: malformed JSON at line {line} column {col}:"):
      list(stream_json.iter_items(str(p), ""))


STREAM_ERRORS = {   # file name: (contents, reader, message)
    "empty.json": (b"  \n", records.read_dataset, "empty.json: expected a JSON list .* got an empty file"),
    "latin1.json": (b'[\n["caf\xe9"]]', records.read_dataset, "latin1.json: not UTF-8 text near line 1"),
    "key.json": (b'{"general_en": [["q", "a"]], 3: []}', records.read_dataset,
                 "key.json: malformed JSON at line 1 column 30: expecting a string key"),
    "bench.json": (b'{"medqa": []}', records.read_bench,
                   "bench.json: ApolloMoEBench must be a JSON list of records, got dict"),
    "where.json": (b'[\n{"conversations": [{"value": "q"}], "source": "general_en"},\n'
                   b'{"conversations": [], "source": "general_en"}]', records.read_dataset,
                   r"where.json: record 1 \(source 'general_en'\) on line 3: empty conv"),
}


@pytest.mark.parametrize("name", sorted(STREAM_ERRORS))
def test_streaming_error_messages(name, tmp_path):
  contents, read, match = STREAM_ERRORS[name]
  (tmp_path / name).write_bytes(contents)
  with pytest.raises(ValueError, match=match):
    read(str(tmp_path / name))


def test_streaming_parse_of_a_large_file_has_bounded_memory(tmp_path):
  path = tmp_path / "big.json"
  rng = np.random.default_rng(0)
  words = F.WORDS["en"] + F.WORDS["zh"]                      # multi-byte characters across chunk ends
  variants = [json.dumps({"conversations": [{"from": "human", "value": " ".join(rng.choice(words, 60))},
                                            {"from": "gpt", "value": " ".join(rng.choice(words, 200))}],
                          "source": "medicalWeb_zh_qa", "class": "major"}, ensure_ascii=False) for _ in range(37)]
  big = json.dumps({"conversations": [{"value": "q"}, {"value": "x" * 600_000}], "source": "general_zh"})
  assert len(big) > 2 * stream_json.CHUNK                   # one record above the read size
  n = 8000
  with open(path, "w", encoding="utf-8") as f:
    f.write("[" + ",\n".join(big if i == n // 2 else variants[i % 37] for i in range(n)) + "]")
  size = os.path.getsize(path)
  tracemalloc.start()
  count = tokens = 0
  for s in records.iter_dataset_file(str(path)):
    count += 1
    tokens += len(s.turns[1])
  peak = tracemalloc.get_traced_memory()[1]
  tracemalloc.stop()
  assert count == n and tokens > 600_000
  assert size > 13e6 and peak < 4e6, (size, peak)     # ~ the big record + a few chunks, not the file (~3 MB)


def _same_corpus(a, b):
  assert len(a) == len(b) and np.array_equal(a.lengths, b.lengths) and a.sources() == b.sources()
  assert all(all(np.array_equal(x, y) for x, y in zip(a.sample(i), b.sample(i))) for i in range(len(a)))


CONCURRENT = textwrap.dedent("""
  import sys, time
  from apollo_jax.data import token_cache, tokenizer
  token_cache.CHUNK_RECORDS = 8                      # several chunks -> the worker pool is used
  build = token_cache.build
  def slow_build(*a):
    print("BUILDING", flush=True)
    time.sleep(1.0)                                  # hold the lock while the other process starts
    build(*a)
  token_cache.build = slow_build
  if __name__ == "__main__":
    c = token_cache.open_corpus(sys.argv[1], sys.argv[2], tokenizer.load_tokenizer(sys.argv[3]), workers=2)
    print("PID", c.meta["build_pid"], len(c))
""")


def test_concurrent_parallel_build_builds_once(env, tmp_path):
  script = tmp_path / "build.py"
  script.write_text(CONCURRENT)
  cache = str(tmp_path / "cache")
  cmd = [sys.executable, str(script), env.lst, cache, env.tok]
  procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=ROOT)) for _ in range(2)]
  outs = [p.communicate(timeout=120) for p in procs]
  assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
  text = "".join(o[0] for o in outs)
  assert text.count("BUILDING") == 1                   # one built, the other waited and reused it
  assert len({line for line in text.splitlines() if line.startswith("PID")}) == 1
  key_dirs = os.listdir(os.path.join(cache, "tfds", "apollo_moe_tokens"))
  assert len([d for d in key_dirs if not d.endswith(".lock")]) == 1      # no temporary folder left
  parallel = token_cache.open_corpus(env.lst, cache, env.tokenizer)
  assert parallel.meta["build_workers"] == 2
  _same_corpus(parallel, token_cache.open_corpus(env.lst, str(tmp_path / "serial"), env.tokenizer, workers=1))


def test_cache_reused_and_rebuilt_on_change(env, tmp_path, monkeypatch):
  path = F.write_json(tmp_path / "d.json", F.to_list_form(F.make_conversations(3)))
  cache = str(tmp_path / "cache")
  first = token_cache.open_corpus(path, cache, env.tokenizer)
  build = token_cache.build
  monkeypatch.setattr(token_cache, "build", lambda *a: pytest.fail("rebuilt an unchanged corpus"))
  moved = str(tmp_path / "moved.json")
  os.rename(path, moved)                               # moving keeps the build (mtime kept, path not hashed)
  os.rename(moved, path)
  assert token_cache.open_corpus(path, cache, env.tokenizer).meta == first.meta
  monkeypatch.setattr(token_cache, "build", build)
  items = json.load(open(path))
  F.write_json(path, items + items[:1])                # content changed -> a new build
  assert len(token_cache.open_corpus(path, cache, env.tokenizer)) == len(first) + 1
  key, st = token_cache.cache_key([path], env.tokenizer, False), os.stat(path)
  os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))          # touched -> rebuilt (safe side)
  assert token_cache.cache_key([path], env.tokenizer, False) != key
  os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
  assert token_cache.cache_key([path], env.tokenizer, False) == key
  assert len(os.listdir(os.path.join(cache, "tfds", "apollo_moe_tokens"))) == 4   # two builds + their locks
  edited = tmp_path / "chat.py"                        # the chat template changed -> rebuilt
  edited.write_bytes(open(chat.__file__, "rb").read() + b"\n# edited\n")
  monkeypatch.setattr(chat, "__file__", str(edited))
  assert token_cache.cache_key([path], env.tokenizer, False) != key


@pytest.fixture
def fake_gcs(monkeypatch, tmp_path):
  """gs:// served by fsspec's in-memory filesystem through etils.epath (the same code path as GCS)."""
  import fsspec
  from fsspec.implementations import memory

  class MemoryGCS(memory.MemoryFileSystem):
    protocol = ("gs", "gcs")
    store, pseudo_dirs = {}, [""]

    def __init__(self, *args, **kwargs):
      super().__init__()

  for name in ("gs", "gcs"):
    fsspec.register_implementation(name, MemoryGCS, clobber=True)
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "local"))
  os.makedirs(tmp_path / "local")
  yield MemoryGCS
  MemoryGCS.store.clear()


def test_remote_cache_dir_builds_uploads_and_downloads(env, tmp_path, fake_gcs, monkeypatch):
  from etils import epath
  cache = "gs://bucket/run/data_cache"
  built = token_cache.open_corpus(env.lst, cache, env.tokenizer)
  assert (epath.Path(cache) / os.path.relpath(built.directory, token_cache.local_root(cache)) /
          tfds_builders.META_JSON).exists()
  assert built.directory.startswith(str(tmp_path / "local"))
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "host2"))      # another host: download only
  monkeypatch.setattr(token_cache, "build", lambda *a: pytest.fail("process 1 must not build"))
  other = token_cache.open_corpus(env.lst, cache, env.tokenizer, process_index=1)
  assert other.directory.startswith(str(tmp_path / "host2"))
  _same_corpus(built, other)
  monkeypatch.setattr(token_cache, "WAIT_POLL_S", 0.01)
  with pytest.raises(TimeoutError, match="waited 0 s for process 0 to build the token cache gs://bucket/run"):
    token_cache.open_corpus(env.ext, cache, env.tokenizer, process_index=1, wait_s=0.01)


def test_steps_for_epochs_and_empty_eval(env, caplog):
  c = F.tiny_config(env.lst, env.tok, eval_fraction=0.0)
  data = pipeline.make_data(c, str(env.root / "c2"))
  g, r0, r1 = c.global_batch, data.rows.epoch_rows(0), data.rows.epoch_rows(1)
  assert r0 == data.stats["rows_per_epoch"] and data.stats["eval_rows"] == 0
  assert data.steps_for_epochs(1) == -(-r0 // g) and data.steps_for_epochs(2) == -(-(r0 + r1) // g)
  assert data.steps_for_epochs(0.5) == math.ceil(0.5 * r0 / g) and data.steps_for_epochs(1.5) == math.ceil((r0 + r1 / 2) / g)
  with pytest.raises(ValueError, match="epochs=0 must be > 0"):
    data.steps_for_epochs(0)
  with caplog.at_level(logging.WARNING):
    quiet = pipeline.skip_empty_eval(c, data)
  assert quiet.eval_every == 0 and c.eval_every > 0 and "no evaluation: the eval split is empty" in caplog.text
  with_eval = pipeline.make_data(F.tiny_config(env.lst, env.tok), str(env.root / "c2"))
  assert pipeline.skip_empty_eval(c, with_eval) is c


def test_big_configs_keep_all_training_data():
  from configs import apollo_2b, apollo_moe_0p5b, apollo_moe_7b
  for m in (apollo_moe_0p5b, apollo_2b, apollo_moe_7b):
    assert m.get_config().data.eval_fraction == 0.0


def test_data_pipeline_benchmark_runs(tmp_path):
  out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "data_pipeline.py"), "--records=300",
                        "--rows=8", "--workers=2", f"--dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode == 0, out.stderr[-3000:]
  for name in ("parse:", "build_w1:", "build_w2:", "plan:", "rows:", "grain:", "need:", "headroom:"):
    assert name in out.stdout, out.stdout


def test_no_valid_records_is_a_clear_error(env, tmp_path):
  path = F.write_json(tmp_path / "allbad.json", [{"conversations": [], "source": "general_en"}, {"source": 3}])
  with pytest.raises(ValueError, match=r"no valid records in \[.*allbad.json'\] \(2 bad ones skipped\)"):
    token_cache.open_corpus(path, str(tmp_path / "cache"), env.tokenizer, skip_bad=True)
  assert not [d for d in os.listdir(tmp_path / "cache" / "tfds" / "apollo_moe_tokens")
              if not d.endswith(".lock")]                                           # no leftovers


@pytest.mark.parametrize("victim", ["index.npz", "shard"])
def test_a_damaged_token_cache_is_rebuilt(env, tmp_path, caplog, victim):
  first = token_cache.open_corpus(env.ext, str(tmp_path), env.tokenizer)
  names = os.listdir(first.directory)
  name = victim if victim in names else next(n for n in names if ".array_record-" in n)
  path = os.path.join(first.directory, name)
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)
  with caplog.at_level(logging.WARNING):
    again = token_cache.open_corpus(env.ext, str(tmp_path), env.tokenizer)
  assert "is damaged" in caplog.text and "rebuilding it" in caplog.text
  assert again.meta["build_pid"] == os.getpid()
  _same_corpus(again, token_cache.open_corpus(env.ext, str(tmp_path / "fresh"), env.tokenizer))
