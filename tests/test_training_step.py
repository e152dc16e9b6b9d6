"""train_step: loss/family metrics vs numpy, gradient accumulation, NaN hook; MFU accounting."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apollo_jax import languages
from apollo_jax.training import metrics
from apollo_jax.training import optimizer
from apollo_jax.runtime import sharding
from apollo_jax.training import step as ts
from apollo_jax.model import transformer
from configs import tiny
from tolerance import assert_close

V, D, B, S = 32, 8, 4, 6
CE_TERMS = D + V + B * S      # f32 logits over D, log-sum-exp over V, sums over the B*S tokens


class StandIn(nn.Module):
  """logits = embed[ids] @ W: a model with the transformer's call signature and no MoE."""

  @nn.compact
  def __call__(self, ids, language_ids=None, segment_ids=None, positions=None, train=False,
               return_hidden=False):
    p = lambda name, names, shape: self.param(
        name, nn.with_logical_partitioning(nn.initializers.normal(1.0), names), shape)
    x, w = p("embedding", ("vocab", "embed"), (V, D))[ids], p("kernel", ("embed", "vocab"), (D, V))
    return (x, w) if return_hidden else x @ w


def _config(**kw):
  c = tiny.get_config()
  c.global_batch, c.data.seq_len, c.steps = B, S, 10
  c.optim.warmup_ratio = 0.0
  c.update(kw)
  return c


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  return {"input_ids": rng.integers(0, V, (B, S)), "targets": rng.integers(0, V, (B, S)),
          "loss_mask": rng.integers(0, 2, (B, S)), "segment_ids": np.ones((B, S)),
          "positions": np.broadcast_to(np.arange(S), (B, S)),
          "language_ids": rng.integers(0, 50, (B, S))}


def _setup(config):
  mesh = sharding.make_mesh(config, jax.devices()[:1])
  tx = optimizer.make_optimizer(config)
  _, shardings, init = ts.state_shardings(StandIn(), config, tx, mesh)
  return mesh, tx, shardings, ts.init_state(config, tx, shardings, init)


def _np_ce(params, b):
  logits = params["embedding"][b["input_ids"]] @ params["kernel"]
  logits = logits - logits.max(-1, keepdims=True)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  return -np.take_along_axis(logp, b["targets"][..., None], -1)[..., 0]


def test_loss_and_family_metrics_match_numpy():
  c = _config()
  mesh, tx, _, state = _setup(c)
  b = _batch()
  params = jax.tree.map(np.asarray, state["params"])
  loss, m = ts.forward(StandIn(), c, state["params"], jax.tree.map(jnp.asarray, b), train=True)
  ce, mask = _np_ce(params, b), b["loss_mask"]
  assert_close(loss, (ce * mask).sum() / mask.sum(), dtype=np.float32, terms=CE_TERMS)   # vs float64
  fam = languages.expert_map("family7")[b["language_ids"]]
  sels = [mask * (fam == f) for f in range(7)]
  assert_close(m["family_ce_sum"][:7], [(ce * sel).sum() for sel in sels], dtype=np.float32, terms=CE_TERMS)
  for f, sel in enumerate(sels):
    assert m["family_count"][f] == sel.sum()
  got = ts.family_losses(m["family_ce_sum"], m["family_count"])
  assert set(got) == {f"loss/{languages.FAMILIES[f]}" for f in set(fam[mask > 0].tolist())}


@pytest.mark.slow
@pytest.mark.parametrize("accum", [1, 2])
def test_train_step_is_mean_over_micro_batches(accum):
  c = _config(grad_accum=accum)
  mesh, tx, shardings, state = _setup(c)
  b = _batch(1)
  params0 = jax.tree.map(np.asarray, state["params"])
  opt0 = state["opt_state"]
  # reference: micro-batch a = rows a, a+A, ...; loss and grads averaged over micro-batches
  def micro_loss(p, mb):
    return ts.forward(StandIn(), c, p, mb, train=True)[0]
  losses, grads = zip(*[jax.value_and_grad(micro_loss)(state["params"], jax.tree.map(lambda x: jnp.asarray(x[a::accum]), b))
                        for a in range(accum)])
  grads = jax.tree.map(lambda *g: sum(g) / accum, *grads)
  updates, _ = tx.update(grads, opt0, state["params"])
  want = jax.tree.map(lambda p, u: np.asarray(p + u), state["params"], updates)

  with jax.set_mesh(mesh):
    step = ts.jit_train_step(ts.make_train_step(StandIn(), c, tx, mesh), shardings, mesh)
    new, m = step(state, jax.tree.map(lambda x: jnp.asarray(x, jnp.int32), b))
  # the jitted (accumulating) step vs eager micro-batches: the same f32 sums in other orders; the
  # norm adds a sum over the 2 V D gradient entries
  assert_close(m["loss"], np.mean(losses), dtype=np.float32, terms=CE_TERMS)
  assert_close(m["grad_norm"], np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree.leaves(grads))),
               dtype=np.float32, terms=2 * CE_TERMS + 2 * V * D)
  assert int(new["step"]) == 1 and float(m["lr"]) == pytest.approx(c.optim.lr)
  for k in want:   # p + Adam's first step (about lr * sign(g)): a couple of f32 roundings of p
    assert_close(new["params"][k], want[k], dtype=np.float32, terms=2, err_msg=k)
    assert not np.allclose(want[k], params0[k])


def test_nan_hook_poisons_only_the_chosen_update():
  c = _config(debug_nan_at_step=2)
  mesh, tx, shardings, state = _setup(c)
  b = jax.tree.map(lambda x: jnp.asarray(x, jnp.int32), _batch())
  with jax.set_mesh(mesh):
    step = ts.jit_train_step(ts.make_train_step(StandIn(), c, tx, mesh), shardings, mesh)
    state, m1 = step(state, b)
    state, m2 = step(state, b)
  assert np.isfinite(m1["loss"]) and np.isnan(m2["loss"]) and np.isnan(m2["grad_norm"])


@pytest.mark.parametrize("arg", ["moe_layers=none", "", "routing=language,expert_map=major12"])
def test_active_params_match_the_model(arg):
  """Independent count from the real param tree: every matmul weight, with experts counted k/E."""
  c = tiny.get_config(arg)
  params = transformer.abstract_params(c)
  e_pad = c.moe.num_experts  # expert_multiple 0 and mesh.expert 1: no padding
  total = 0
  for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    key = jax.tree_util.keystr(path)
    if key.endswith(("['bias']", "['scale']")):
      continue                                  # not matmuls
    n = int(np.prod(x.shape))
    total += n * c.moe.top_k // e_pad if "['experts']" in key else n
  assert metrics.active_params(c) == total
  hd = c.model.hidden_size // c.model.num_heads
  want = 6 * total + 6 * c.model.num_layers * c.data.seq_len * c.model.num_heads * hd
  assert metrics.flops_per_token(c) == want


def test_peak_flops_table_and_override():
  c = tiny.get_config()

  class Dev:
    def __init__(self, kind, platform="tpu"):
      self.device_kind, self.platform = kind, platform
  assert metrics.peak_flops(c, [Dev("TPU v5 lite")] * 4)[0] == 4 * 197e12
  assert metrics.peak_flops(c, [Dev("TPU v5")])[0] == 459e12
  assert metrics.peak_flops(c, [Dev("NVIDIA H100 80GB HBM3", "gpu")] * 8)[0] == 8 * 989e12
  assert metrics.peak_flops(c, [Dev("cpu", "cpu")] * 8) == (metrics.CPU_NOMINAL_FLOPS, "cpu nominal")
  c.peak_flops_per_device = 1e12
  assert metrics.peak_flops(c, [Dev("TPU v4")] * 2)[0] == 2e12
  assert metrics.mfu(c, 1000.0, 1e15) == pytest.approx(metrics.flops_per_token(c) * 1000.0 / 1e15)
