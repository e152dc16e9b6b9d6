"""Evaluation with the tiny model through apollo_jax.inference: a model built to prefer one
answer, both modes end to end on the shipped bench sample (runner and CLI), and train.py's
bench_eval hook."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import lm_fixtures
from tolerance import assert_close, network_terms
from apollo_jax import config as cfg, inference
from apollo_jax.data import tokenizer as tok_lib
from apollo_jax.evaluation import bench, evaluate, in_training, prompts, scoring
from apollo_jax.model import transformer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(REPO, "data/sample/apollo_moe_bench_sample.json")
TOKENIZER = os.path.join(REPO, "data/sample/tokenizer.model")


@pytest.fixture(scope="module")
def tiny():
  """(config, random host params N(0, 0.02)) of configs/tiny.py (no compile needed)."""
  config = cfg.load("tiny")
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda a: rng.normal(0, 0.02, a.shape).astype(np.float32),
                        transformer.abstract_params(config))
  return config, params


ONE_DEVICE = jax.devices()[:1]       # one-device meshes compile fastest (sharding is i6's to test)


def _preferring(params, token):
  """Every kernel 0, so each layer passes its input through and logits[v] = sqrt(H) * embed[v, 0]
  for any input token: `token` (embed 3, all others 1) wins everywhere by a wide margin."""
  p = jax.tree.map(np.zeros_like, params)
  p = jax.tree_util.tree_map_with_path(
      lambda path, x: np.ones_like(x) if "norm" in jax.tree_util.keystr(path) and x.ndim == 1 else x, p)
  emb = np.zeros_like(p["embed_tokens"]["embedding"])
  emb[:, 0] = 1.0
  emb[token, 0] = 3.0
  p["embed_tokens"]["embedding"] = emb
  return p


@pytest.mark.slow
def test_loglik_picks_planted_answer(tiny):
  config, params = tiny
  tok = tok_lib.load_tokenizer(TOKENIZER)
  (c_token,) = [i for i in tok.encode("(C)") if tok.decode([i]) == "C"]
  lm = inference.from_params(config, _preferring(params, c_token), tok, devices=ONE_DEVICE)
  item = bench.Item(0, "headqa", "es", "¿Cuál?", "(A) fiebre\n(B) fiebre\n(C) fiebre\n(D) fiebre",
                    ("A", "B", "C", "D"), ("fiebre",) * 4, "(A)", "A")
  t = prompts.load_templates()
  ps, _ = prompts.build([item], [item], t)
  (out,) = scoring.loglik(lm, ps, t, progress=False)
  assert out["loglik_pred"] == "C" and out["loglik_norm_pred"] == "C"
  others = [out["loglik"][x] for x in "ABD"]
  # the same tokens scored at other positions and batch rows: only the f32 log-softmax over the
  # 4096-token vocabulary and the sum over the continuation reorder
  assert_close(others[1:], others[:1] * 2, dtype=np.float32, terms=4096 + 10)
  assert out["loglik"]["C"] > max(others) + 5
  (gen,) = scoring.generate(lm, ps, max_new_tokens=3, progress=False)
  assert gen == {"response": "CCC", "extracted": "C"}      # greedy: only the preferred token


@pytest.mark.slow
def test_both_modes_on_the_sample(tmp_path):
  lm = lm_fixtures.randomized("hybrid8")                      # random weights, far from uniform logits
  preds, scores = evaluate(lm, SAMPLE, str(tmp_path), mode="both", limit=1, languages=["en", "ckb"], shots=1,
                           max_new_tokens=4, batch_size=8, progress=False, model_name="hybrid8")
  assert len(preds) == 2 + 1 and scores["counts"]["scored"] == 3
  assert set(scores["per_language"]) == {"en", "ckb"} and [p["shots"] for p in preds] == [1, 1, 1]
  for p in preds:
    assert set(p["loglik"]) == set("ABCD") and all(v < 0 for v in p["loglik"].values())
    assert p["extracted"] in (None, *"ABCDEF") and set(p["correct"]) == {"generate", "loglik", "loglik_norm"}
  assert scores["params"] == 706_496                          # configs/tiny.py total (README)
  assert sorted(os.listdir(tmp_path)) == ["per_language.png", "predictions.jsonl", "report.md", "scores.json"]
  # the option scores are lm.score's on the same token ids; the responses are lm.generate's
  items = bench.read(SAMPLE)[0]
  t = prompts.load_templates()
  ps, _ = prompts.build([next(i for i in items if i.id == p["id"]) for p in preds], items, t, shots=1)
  ids = [prompts.encode(lm.tokenizer, p.text) for p in ps]
  conts = prompts.continuations(t, ps[0].item)
  want = lm.score([ids[0]] * len(conts), [lm.tokenizer.encode(c) for c in conts])
  # evaluate batches the options differently: f32 logits of the tiny decoder (4 layers, d_model
  # 64, d_ff 128), a log-softmax over 4096 and a sum over the continuation in other orders
  assert_close([preds[0]["loglik"][x] for x in ps[0].item.labels], want, dtype=np.float32,
               terms=network_terms(4, 64, 128) + 4096 + 10)
  assert [p["response"] for p in preds] == [lm.decode(g) for g in lm.generate(ids, max_new_tokens=4)]


@pytest.mark.slow
def test_cli(tmp_path):
  wd = lm_fixtures.workdir(str(tmp_path))                   # a training workdir, checkpoints 2 and 4
  out = tmp_path / "eval"
  r = subprocess.run([sys.executable, "-m", "apollo_jax.evaluate", f"--model={wd}", "--step=2", f"--out={out}",
                      "--mode=loglik", "--limit=1", "--languages=sw"],
                     cwd=REPO, capture_output=True, text=True, timeout=300,
                     env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""})
  assert r.returncode == 0, r.stderr[-3000:]
  assert "loglik: Major" in r.stdout and "questions/s" in r.stderr
  s = json.loads((out / "scores.json").read_text())
  assert s["mode"] == "loglik" and set(s["per_language"]) == {"sw"} and s["counts"]["scored"] == 1
  assert s["model"] == f"{wd}@2"
  r = subprocess.run([sys.executable, "-m", "apollo_jax.evaluate", f"--model={tmp_path}/nothing", f"--out={out}"],
                     cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert r.returncode != 0 and "does not exist" in r.stderr


def test_dev_subset():
  items, _ = bench.read(SAMPLE)
  dev = in_training.dev_subset(items, 0.1, seed=0)
  assert len(dev) == len({it.source for it in items})        # 10% of 2..5 questions rounds to 1
  assert dev == in_training.dev_subset(items, 0.1, seed=0)
  assert dev != in_training.dev_subset(items, 0.1, seed=1)
  assert len(in_training.dev_subset(items, 1.0, seed=0)) == len(items)


@pytest.mark.slow
def test_bench_eval_logs_from_train(tmp_path, data, jit_cache):
  """train.py with bench_eval: bench/* accuracies in metrics.jsonl at the due steps only."""
  import train_fixtures
  items = json.load(open(SAMPLE, encoding="utf-8"))
  small = [r for r in items if r["source"] in ("headqa", "mmlu-medical-ckb")]
  path = tmp_path / "bench.json"
  path.write_text(json.dumps(small, ensure_ascii=False), encoding="utf-8")
  # the default 30-step run of train_fixtures (its train step is compiled once per session)
  flags = train_fixtures.flags(data, eval_every=0, ckpt__every=100, bench_eval__every=20, bench_eval__files=str(path),
                               bench_eval__fraction=0.5, bench_eval__shots=0, bench_eval__batch_size=32)
  train_fixtures.check_ok(train_fixtures.run(str(tmp_path / "run"), flags, cache_dir=jit_cache))
  recs = {r["step"]: r for r in train_fixtures.read_metrics(str(tmp_path / "run"))}
  assert [s for s in recs if "bench/major" in recs[s]] == [20, 30]        # every 20 steps and the last
  r = recs[30]
  assert r["bench/questions"] == 3 + 1                       # half of 5 rounds up to 3; at least 1 of 2
  assert {k for k in r if k.startswith("bench")} == {"bench/questions", "bench/major", "bench/minor", "bench/es",
                                                     "bench/ckb", "bench_norm/major", "bench_norm/minor"}
  assert r["bench/major"] == r["bench/es"] and r["bench/minor"] == r["bench/ckb"]
  assert r["bench/es"] in (0, 1 / 3, 2 / 3, 1) and 0 <= r["bench_norm/major"] <= 1


def test_bench_eval_config_errors():
  config = cfg.load("tiny")
  assert in_training.make(config, None, None) is None        # off by default
  config.bench_eval.every = 5
  with pytest.raises(ValueError, match="needs bench_eval.files"):
    in_training.make(config, None, None)
  config.bench_eval.files, config.bench_eval.fraction = SAMPLE, 0.0
  with pytest.raises(ValueError, match="fraction"):
    in_training.make(config, None, None)
