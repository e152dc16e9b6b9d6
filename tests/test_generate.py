"""KV-cache generation: greedy equals HF `generate` token for token (a batch of different
lengths, left padding), every decode step's logits equal the full forward, no recompilation per
token or per prompt length within a bucket, seeded sampling, per-row EOS, and the CLI."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import lm_fixtures as lf  # noqa: E402
from tolerance import assert_close, network_terms  # noqa: E402
from apollo_jax.inference import decoding  # noqa: E402
from apollo_jax.runtime import sharding

_rng = np.random.RandomState(3)
PROMPTS = [_rng.randint(10, 4096, n).tolist() for n in (3, 11, 20, 7)]


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
  """(LM of the randomized Post-MoE, 7 experts padded to 8; HF model of its export; export dir)."""
  lm = lf.randomized("hybrid8")
  out = lf.export(lm, str(tmp_path_factory.mktemp("gen_export")))
  model, info = lf.hf_model(out)
  assert not any(info.values())
  return lm, model, out


def _hf_greedy(model, prompts, max_new_tokens, eos, pad):
  P = max(len(p) for p in prompts)
  ids = torch.tensor([[pad] * (P - len(p)) + p for p in prompts])
  mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
  with torch.no_grad():
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=eos, pad_token_id=pad)[:, P:].tolist()
  return [row[:row.index(eos) + 1] if eos in row else row for row in out]


@pytest.mark.slow
def test_greedy_equals_hf_generate(moe):
  lm, model, _ = moe
  got = lm.generate(PROMPTS, max_new_tokens=12)
  assert got == _hf_greedy(model, PROMPTS, 12, lm.eos_id, lm.tokenizer.pad_id)
  assert all(len(g) == 12 for g in got) and len({tuple(g) for g in got}) == len(got)


def test_decode_logits_equal_full_forward(moe):
  lm, _, _ = moe
  n = 8
  with sharding.activate(lm.mesh):
    toks, step_logits = decoding.generate(lm._decoder, lm.params, PROMPTS, n, eos_id=-1, pad_id=0,
                                          return_logits=True, check_every=n)
  assert step_logits.shape == (n, len(PROMPTS), 4096)
  rows = [p + t[:-1] for p, t in zip(PROMPTS, toks)]
  S = max(len(r) for r in rows)
  ids, seg, pos = decoding.left_pad(rows, S, 0)
  full = lm.logits(ids, segment_ids=seg, positions=pos)[:, S - n:]          # [B, n, V]
  # the KV cache attends over other shapes than the full forward: the f32 reductions of the 4
  # layers (d_model 64, d_ff 128) run in another order
  assert_close(step_logits.transpose(1, 0, 2), full, dtype=np.float32, terms=network_terms(4, 64, 128))
  assert np.abs(full).max() > 1.0
  np.testing.assert_array_equal(np.argmax(full, -1), np.asarray(toks))


def test_no_recompile_per_token_or_length_in_bucket(moe):
  lm, _, _ = moe
  lm.generate(PROMPTS, max_new_tokens=12)                 # batch bucket 4, prompts 32, new tokens 16
  sizes = (decoding.Decoder.prefill._cache_size(), decoding.Decoder.step._cache_size())
  other = [list(range(10, 10 + n)) for n in (30, 17, 25)]
  lm.generate(other, max_new_tokens=16, temperature=0.7, top_p=0.9)   # same buckets, sampling
  assert (decoding.Decoder.prefill._cache_size(), decoding.Decoder.step._cache_size()) == sizes
  assert decoding.bucket(3) == 16 and decoding.bucket(17) == 32 and decoding.bucket(3, 1) == 4


def test_seeded_sampling(moe):
  lm, _, _ = moe                                 # the shapes of the greedy test: nothing compiles
  a = lm.generate(PROMPTS, max_new_tokens=8, temperature=1.0, seed=1)
  assert a == lm.generate(PROMPTS, max_new_tokens=8, temperature=1.0, seed=1)
  assert a != lm.generate(PROMPTS, max_new_tokens=8, temperature=1.0, seed=2)
  greedy = lm.generate(PROMPTS, max_new_tokens=8)
  assert a != greedy
  assert lm.generate(PROMPTS, max_new_tokens=8, temperature=1.0, top_p=1e-6, seed=5) == greedy


def test_top_p_keeps_the_nucleus():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  keys = jax.random.split(jax.random.key(0), 4000)
  draw = jax.jit(jax.vmap(lambda k, top_p: decoding.sample(logits, k, 1.0, top_p)[0], in_axes=(0, None)))
  for top_p, allowed, p0 in ((0.7, {0, 1}, 0.5 / 0.8), (0.85, {0, 1, 2}, 0.5 / 0.95), (1.0, {0, 1, 2, 3}, 0.5)):
    d = np.asarray(draw(keys, top_p))
    assert set(d.tolist()) == allowed
    assert abs(np.mean(d == 0) - p0) < 0.04


def test_each_row_stops_at_eos(moe):
  lm, _, _ = moe
  eos = lm.eos_id
  try:
    lm.eos_id = -1
    free = lm.generate(PROMPTS, max_new_tokens=10)
    lm.eos_id = stop = free[0][2]                  # row 0 stops after its 3rd token
    got = lm.generate(PROMPTS, max_new_tokens=10)
  finally:
    lm.eos_id = eos
  want = [row[:row.index(stop) + 1] if stop in row else row for row in free]
  assert got == want and len(got[0]) <= 3 and max(len(g) for g in got) > 3


def test_min_new_tokens_holds_eos_back(moe):
  """EOS (here: the greedy first token of row 0) is not drawn before min_new_tokens; the rest
  of the rows, and what follows, are unchanged greedy decoding."""
  lm, _, _ = moe
  eos = lm.eos_id
  try:
    lm.eos_id = -1
    free = lm.generate(PROMPTS, max_new_tokens=6)
    lm.eos_id = stop = free[0][0]                  # row 0 would stop at once
    now = lm.generate(PROMPTS, max_new_tokens=6)
    held = lm.generate(PROMPTS, max_new_tokens=6, min_new_tokens=2)
  finally:
    lm.eos_id = eos
  assert now[0] == [stop]
  assert len(held[0]) >= 2 and stop not in held[0][:2]
  assert all(r == f[:len(r)] for r, f in zip(held[1:], free[1:]) if stop not in f[:2])


@pytest.mark.slow
def test_cli_batch_equals_hf(moe, tmp_path):
  lm, model, out = moe
  questions = ["What is a fever?", "Bonjour, j'ai de la fièvre.", "发烧怎么办"]
  src = tmp_path / "in.jsonl"
  src.write_text("".join(json.dumps({"prompt": q}, ensure_ascii=False) + "\n" for q in questions[:2])
                 + json.dumps({"messages": [{"role": "user", "content": questions[2]}]}, ensure_ascii=False) + "\n")
  dst = tmp_path / "out.jsonl"
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": lf.REPO}
  env.pop("XLA_FLAGS", None)
  run = subprocess.run([sys.executable, "-m", "apollo_jax.generate", f"--model={out}", f"--prompts={src}",
                        f"--out={dst}", "--chat", "--max_new_tokens=6"], cwd=lf.REPO, env=env,
                       capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "3/3" in run.stderr                     # the progress bar
  lines = [json.loads(x) for x in dst.read_text().splitlines()]
  assert [x.get("prompt") for x in lines] == questions[:2] + [None]
  tok = transformers.AutoTokenizer.from_pretrained(out)
  prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                     return_dict=True)["input_ids"] for q in questions]
  want = _hf_greedy(model, [list(p) for p in prompts], 6, lm.eos_id, lm.tokenizer.pad_id)
  assert [x["completion"] for x in lines] == [lm.decode(w) for w in want]
