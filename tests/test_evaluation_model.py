"""Evaluation with the tiny model: the training-mesh scorer against a one-sequence numpy
reference, a model built to prefer one answer, and the bench_eval hook of train.py."""

import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from apollo_jax import config as cfg, sharding
from apollo_jax.data import tokenizer as tok_lib
from apollo_jax.evaluation import bench, in_training, prompts, scoring
from apollo_jax.model import transformer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(REPO, "data/sample/apollo_moe_bench_sample.json")


@pytest.fixture(scope="module")
def tiny():
  config = cfg.load("tiny")
  mesh = sharding.make_mesh(config)
  model = transformer.build_model(config)
  tok = tok_lib.load_tokenizer(os.path.join(REPO, "data/sample/tokenizer.model"))
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), np.zeros((1, 8), np.int32))["params"])
  return config, mesh, model, tok, jax.device_get(params)


def _reference(model, params, tok, pairs):
  """Each continuation's summed log-probability from one unsharded forward pass of all the
  sequences (right padding cannot change earlier positions of a causal model), numpy log-softmax."""
  seqs = [(in_training.encode_prompt(tok, p), tok.encode(c)) for p, c in pairs]
  length = max(len(p) + len(c) for p, c in seqs)
  ids = np.zeros((len(seqs), length), np.int32)
  for r, (p, c) in enumerate(seqs):
    ids[r, :len(p) + len(c)] = p + c
  logits = np.asarray(jax.jit(model.apply)({"params": params}, ids), np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  return [sum(logp[r, t - 1, ids[r, t]] for t in range(len(p), len(p) + len(c))) for r, (p, c) in enumerate(seqs)]


def test_params_lm_score_matches_reference(tiny):
  config, mesh, model, tok, params = tiny
  items, _ = bench.read(SAMPLE)
  t = prompts.load_templates()
  ps, _ = prompts.build(items[:3], items, t, shots=1)
  pairs = [(p.text, c) for p in ps for c in prompts.continuations(t, p.item)][:10]
  assert prompts.EOS_TEXT in pairs[0][0]
  with jax.set_mesh(mesh):
    lm = in_training.ParamsLM(model, mesh, tok, batch_size=3).bind(params)
    got = lm.score([p for p, _ in pairs], [c for _, c in pairs])      # 10 pairs in 2 batches of 8
  assert lm.rows == 8
  np.testing.assert_allclose(got, _reference(model, params, tok, pairs), rtol=2e-4, atol=1e-3)
  ids = in_training.encode_prompt(tok, pairs[0][0])
  assert ids.count(tok.eos_id) == pairs[0][0].count(prompts.EOS_TEXT) == 1


def _preferring(params, token):
  """Layers output zero (every kernel 0), so logits[v] = sqrt(H) * embed[v, 0]: `token` wins."""
  p = jax.tree.map(lambda x: np.zeros(x.shape, np.float32), params)
  p = jax.tree_util.tree_map_with_path(
      lambda path, x: np.ones_like(x) if "norm" in jax.tree_util.keystr(path).lower() and x.ndim == 1 else x, p)
  emb = np.zeros_like(p["embed_tokens"]["embedding"])
  emb[:, 0] = 1.0
  emb[token, 0] = 3.0
  p["embed_tokens"]["embedding"] = emb
  return p


def test_loglik_picks_planted_answer(tiny):
  config, mesh, model, tok, params = tiny
  (c_token,) = [i for i in tok.encode("(C)") if tok.decode([i]) == "C"]
  item = bench.Item(0, "headqa", "es", "¿Cuál?", "(A) fiebre\n(B) fiebre\n(C) fiebre\n(D) fiebre",
                    ("A", "B", "C", "D"), ("fiebre",) * 4, "(A)", "A")
  t = prompts.load_templates()
  ps, _ = prompts.build([item], [item], t)
  with jax.set_mesh(mesh):
    lm = in_training.ParamsLM(model, mesh, tok, batch_size=4).bind(_preferring(params, c_token))
    (out,) = scoring.loglik(lm, ps, t, progress=False)
  assert out["loglik_pred"] == "C" and out["loglik_norm_pred"] == "C"
  others = [out["loglik"][x] for x in "ABD"]
  assert np.ptp(others) < 1e-3 and out["loglik"]["C"] > max(others) + 5


def test_dev_subset():
  items, _ = bench.read(SAMPLE)
  dev = in_training.dev_subset(items, 0.1, seed=0)
  assert len(dev) == len({it.source for it in items})        # 10% of 2..5 questions rounds to 1
  assert dev == in_training.dev_subset(items, 0.1, seed=0)
  assert dev != in_training.dev_subset(items, 0.1, seed=1)
  assert len(in_training.dev_subset(items, 1.0, seed=0)) == len(items)


def test_bench_eval_logs_from_train(tmp_path, data):
  """train.py with bench_eval: bench/* accuracies in metrics.jsonl at the due steps only."""
  import train_fixtures
  items = json.load(open(SAMPLE, encoding="utf-8"))
  small = [r for r in items if r["source"] in ("headqa", "mmlu-medical-ckb")]
  path = tmp_path / "bench.json"
  path.write_text(json.dumps(small, ensure_ascii=False), encoding="utf-8")
  flags = train_fixtures.flags(data, steps=3, eval_every=0, bench_eval__every=2, bench_eval__files=str(path),
                               bench_eval__fraction=0.5, bench_eval__shots=0, ckpt__every=100)
  train_fixtures.check_ok(train_fixtures.run(str(tmp_path / "run"), flags))
  recs = {r["step"]: r for r in train_fixtures.read_metrics(str(tmp_path / "run"))}
  assert "bench/major" not in recs[1] and "bench/major" in recs[2] and "bench/major" in recs[3]  # due + last
  r = recs[3]
  assert r["bench/questions"] == 3 + 1                       # half of 5 rounds up to 3; at least 1 of 2
  assert {k for k in r if k.startswith("bench")} == {"bench/questions", "bench/major", "bench/minor", "bench/es",
                                                     "bench/ckb", "bench_norm/major", "bench_norm/minor"}
  assert r["bench/major"] == r["bench/es"] and r["bench/minor"] == r["bench/ckb"]
  assert r["bench/es"] in (0, 1 / 3, 2 / 3, 1) and 0 <= r["bench_norm/major"] <= 1
