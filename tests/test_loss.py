"""Chunked cross-entropy = plain cross-entropy (value and gradients, with masks); fp32 logits from
both heads; casting params to the compute dtype up front changes no number."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apollo_jax.training import loss
from apollo_jax.training import step as ts
from apollo_jax.model import transformer
from configs import tiny
from tolerance import assert_close, network_terms

B, S, M, V = 2, 12, 8, 50


def _inputs(dtype=jnp.float32):
  k = jax.random.split(jax.random.PRNGKey(0), 4)
  x = jax.random.normal(k[0], (B, S, M)).astype(dtype)
  w = jax.random.normal(k[1], (M, V))
  targets = jax.random.randint(k[2], (B, S), 0, V)
  mask = (jax.random.uniform(k[3], (B, S)) < 0.6).astype(jnp.float32)
  return x, w, targets, mask


def _masked_mean(ce, mask):
  return jnp.sum(ce * mask) / jnp.sum(mask)


def _plain(x, w, targets, mask):
  return _masked_mean(loss.token_ce(transformer.head_logits(x, w), targets), mask)


@pytest.mark.parametrize("chunk", [4, 5, 1, 0, 100])
def test_chunked_ce_equals_plain_ce(chunk):
  x, w, targets, mask = _inputs()
  logits = np.asarray(x, np.float64) @ np.asarray(w, np.float64)     # numpy reference value
  lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  ce_np = lse - np.take_along_axis(logits, np.asarray(targets)[..., None], -1)[..., 0]
  chunked = lambda x, w: _masked_mean(loss.chunked_token_ce(x, w, targets, chunk), mask)
  value, (gx, gw) = jax.jit(jax.value_and_grad(chunked, (0, 1)))(x, w)
  want, (wx, ww) = jax.jit(jax.value_and_grad(_plain, (0, 1)))(x, w, targets, mask)
  # f32 logits over M, log-sum-exp over V, mean over B*S tokens; chunks reorder all three
  assert_close(value, (ce_np * mask).sum() / mask.sum(), dtype=np.float32, terms=M + V + B * S)
  assert_close(value, want, dtype=np.float32, terms=M + V + B * S)
  assert_close(gx, wx, dtype=np.float32, terms=M + 2 * V)           # softmax over V, then dlogits @ w.T
  assert_close(gw, ww, dtype=np.float32, terms=M + V + B * S)       # x.T @ dlogits sums over the tokens
  assert np.all(np.asarray(gx)[np.asarray(mask) == 0] == 0)      # masked tokens get no gradient


def test_chunked_ce_bf16_hidden_states():
  x, w, targets, mask = _inputs(jnp.bfloat16)
  w = w.astype(jnp.bfloat16)
  chunked = lambda x, w: _masked_mean(loss.chunked_token_ce(x, w, targets, 4), mask)
  (value, (gx, gw)), (want, (wx, ww)) = [
      jax.jit(jax.value_and_grad(f, (0, 1)))(x, w)
      for f in (chunked, lambda x, w: _plain(x, w, targets, mask))]
  assert gx.dtype == jnp.bfloat16 and gw.dtype == jnp.bfloat16
  assert_close(value, want, dtype=np.float32, terms=M + V + B * S)   # bf16 inputs, f32 accumulation
  for g, ref in ((gx, wx), (gw, ww)):
    # rounded to bf16 twice (dlogits, the gradient) and summed over the S / 4 chunks in bf16
    assert_close(g, ref, dtype=jnp.bfloat16, terms=2 + S // 4)


def _shapes(jaxpr):
  """Shapes of every value produced anywhere in a jaxpr, including scan/remat bodies."""
  out = []
  for eqn in jaxpr.eqns:
    out += [tuple(v.aval.shape) for v in eqn.outvars]
    for sub in jax.core.jaxprs_in_params(eqn.params):
      out += _shapes(sub)
  return out


def test_chunked_ce_never_builds_whole_logits():
  x, w, targets, mask = _inputs()
  grad = lambda chunk: jax.make_jaxpr(jax.grad(
      lambda x, w: _masked_mean(loss.chunked_token_ce(x, w, targets, chunk), mask), (0, 1)))(x, w)
  assert (B, 4, V) in _shapes(grad(4).jaxpr)
  assert not {(B, S, V), (B * S, V)} & set(_shapes(grad(4).jaxpr))
  assert (B, S, V) in _shapes(grad(0).jaxpr)          # the check can see whole logits


@pytest.fixture(scope="module")
def tiny_bf16():
  """(config, model, params, batch) of a 2-layer tiny model (1 dense, 1 MoE) in bf16, untied head."""
  c = tiny.get_config("moe_layers=last:1")
  c.model.vocab_size, c.model.dtype, c.model.tie_embeddings, c.model.num_layers = 256, "bfloat16", False, 2
  c.data.seq_len, c.loss_chunk = 16, 4
  model = transformer.build_model(c)
  k = jax.random.split(jax.random.PRNGKey(1), 4)
  ids = jax.random.randint(k[0], (2, 16), 0, 256)
  params = nn.meta.unbox(jax.jit(model.init)(k[1], ids))["params"]
  batch = {"input_ids": ids, "targets": jax.random.randint(k[2], (2, 16), 0, 256),
           "loss_mask": (jax.random.uniform(k[3], (2, 16)) < 0.7).astype(jnp.int32),
           "segment_ids": jnp.ones((2, 16), jnp.int32), "positions": jnp.tile(jnp.arange(16), (2, 1)),
           "language_ids": jnp.full((2, 16), 3, jnp.int32)}
  return c, model, params, batch


@pytest.mark.slow
@pytest.mark.parametrize("tie", [False, True])
def test_both_heads_give_fp32_logits_with_fp32_accumulation(tiny_bf16, tie):
  c, _, params, batch = tiny_bf16
  c = c.copy_and_resolve_references()
  c.model.tie_embeddings = tie
  model = transformer.build_model(c)
  if tie:                                       # the same weights, the head tied to the embedding
    params = {k: v for k, v in params.items() if k != "lm_head"}
  logits, (x, w) = jax.jit(lambda p, ids: (model.apply({"params": p}, ids),
                                           model.apply({"params": p}, ids, return_hidden=True)))(
      params, batch["input_ids"])
  assert logits.dtype == jnp.float32 and x.dtype == jnp.bfloat16
  want = np.asarray(x, np.float64) @ np.asarray(w.astype(jnp.bfloat16), np.float64)
  # the same bf16 operands: only the f32 accumulation order over d_model=64 differs
  assert_close(logits, want, dtype=np.float32, terms=c.model.hidden_size)
  assert np.any(np.asarray(logits) != np.asarray(logits.astype(jnp.bfloat16), np.float32))


@pytest.mark.slow
def test_train_loss_is_plain_ce_of_the_logits(tiny_bf16):
  """forward (chunked, params cast up front) = masked CE of the model's own logits, and the
  up-front cast changes no number of the loss, its metrics, or the gradients."""
  c, model, params, batch = tiny_bf16
  lossf = jax.value_and_grad(lambda p: ts.forward(model, c, p, batch, train=True), has_aux=True)
  (value, m), grads = jax.jit(lossf)(params)
  logits, _ = jax.jit(lambda p: model.apply(
      {"params": p}, batch["input_ids"], language_ids=batch["language_ids"],
      segment_ids=batch["segment_ids"], positions=batch["positions"], train=True, mutable=["moe"]))(params)
  mask = batch["loss_mask"].astype(jnp.float32)
  # chunked head vs whole logits: f32 contractions over d_model, V and the 32 tokens reordered
  ce_terms = c.model.hidden_size + c.model.vocab_size + mask.size
  assert_close(value, _masked_mean(loss.token_ce(logits, batch["targets"]), mask), dtype=np.float32,
               terms=ce_terms)
  np.testing.assert_allclose(m["family_count"].sum(), mask.sum())

  as_is = ts.compute_params
  try:
    ts.compute_params = lambda p, config: p        # the layers cast the fp32 params themselves
    (value32, m32), grads32 = jax.jit(lossf)(params)
  finally:
    ts.compute_params = as_is
  # the bf16 roundings must be the same ones, so only f32 reorderings are allowed (a bf16-level
  # difference is what this test is for); backward: the 2 layers' contractions again
  assert_close(value, value32, dtype=np.float32, terms=ce_terms)
  net = network_terms(c.model.num_layers, c.model.hidden_size, c.model.intermediate_size)
  for g, g32 in zip(jax.tree.leaves(grads), jax.tree.leaves(grads32)):
    assert g.dtype == jnp.float32
    assert_close(g, g32, dtype=np.float32, terms=2 * net + ce_terms)
  cast = ts.compute_params(params, c)
  assert cast["layers_0"]["mlp"]["up_proj"]["kernel"].dtype == jnp.bfloat16
  assert cast["layers_1"]["mlp"]["gate"]["kernel"].dtype == jnp.float32     # router stays fp32
