"""Whole-model properties: shapes, packing isolation, RoPE, dtypes, scan/remat/padding invariance."""

import functools
import importlib.util
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apollo_jax import languages
from apollo_jax.model import moe
from apollo_jax.model.config import from_config
from apollo_jax.model.transformer import build_model, layer_plan, moe_aux_loss, moe_metrics
from tolerance import assert_close, network_terms, tolerance

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B, S = 2, 16


def make_config(arg="moe_layers=last:1", **model_fields):
  spec = importlib.util.spec_from_file_location("tiny", os.path.join(ROOT, "configs/tiny.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config(arg)
  m = c.model
  m.vocab_size, m.hidden_size, m.intermediate_size, m.num_layers = 128, 32, 48, 3
  m.init_std = 0.1                  # larger than 0.02 so layers visibly change the logits
  c.moe.router_init_std = 1.0
  c.moe.group_size = 16
  c.moe.expert_multiple = 1
  for k, v in model_fields.items():
    m[k] = v
  return c


_CACHE = {}


def net_terms(c):
  """f32 roundings feeding one logit of the model of config `c`."""
  return network_terms(c.model.num_layers, c.model.hidden_size, c.model.intermediate_size)


def init(c, seed=0):
  """(module, params); params are cached per (param-shaping config, seed): init compiles slowly."""
  module = build_model(c)
  m, e = c.model, c.moe
  key = (m.vocab_size, m.hidden_size, m.intermediate_size, m.num_layers, m.scan_layers,
         m.tie_embeddings, e.layers, e.num_experts, e.shared_expert, e.expert_multiple, seed)
  if key not in _CACHE:
    ids = jnp.zeros((B, S), jnp.int32)
    _CACHE[key] = nn.meta.unbox(jax.jit(module.init)(jax.random.PRNGKey(seed), ids))["params"]
  return module, _CACHE[key]


def run(module, params, ids, train=False, **arrays):
  """jitted apply -> (logits, moe state); faster than eager op-by-op dispatch on 2 cores."""
  f = lambda p, ids, arrays: module.apply({"params": p}, ids, train=train, mutable=["moe"], **arrays)
  return jax.jit(f)(params, ids, arrays)


def tokens(seed=1, shape=(B, S)):
  return jax.random.randint(jax.random.PRNGKey(seed), shape, 0, 128)


LANG = jnp.asarray(np.arange(B * S).reshape(B, S) % 50, jnp.int32)


@pytest.mark.slow
def test_logits_shape_dtype_and_param_tree():
  c = make_config()
  module, params = init(c)
  logits, _ = run(module, params, tokens())
  assert logits.shape == (B, S, 128) and logits.dtype == jnp.float32
  assert set(params) == {"embed_tokens", "layers_0", "layers_2", "norm"}
  assert params["layers_0"]["mlp"]["gate_proj"]["kernel"].shape == (2, 32, 48)
  assert params["layers_2"]["mlp"]["experts"]["down_proj"].shape == (7, 48, 32)
  assert params["layers_2"]["mlp"]["gate"]["kernel"].shape == (32, 7)
  c.model.tie_embeddings = False
  shapes = jax.eval_shape(build_model(c).init, jax.random.PRNGKey(0), jnp.zeros((B, S), jnp.int32))
  assert shapes["params"]["lm_head"]["kernel"].value.shape == (32, 128)


def test_layer_plan():
  c = make_config("moe_layers=1;3")
  c.model.num_layers = 4
  assert [(p["name"], p["kind"], p["count"], p["stacked"]) for p in layer_plan(from_config(c))] == [
      ("layers_0", "dense", 1, True), ("layers_1", "moe", 1, False),
      ("layers_2", "dense", 1, True), ("layers_3", "moe", 1, False)]
  c.model.scan_layers = False
  assert [p["stacked"] for p in layer_plan(from_config(c))] == [False] * 4


@pytest.mark.slow
@pytest.mark.parametrize("train", [False, True])
def test_packed_segments_are_isolated(train):
  c = make_config()
  c.moe.capacity_factor = 0.0           # no drops, so tokens cannot compete across segments
  module, params = init(c)
  seg = jnp.asarray([[1] * 6 + [2] * 5 + [3] * 5])
  pos = jnp.asarray([list(range(6)) + list(range(5)) + list(range(5))])
  ids = tokens(2, (1, S))
  lang = LANG[:1]
  run = lambda ids, seg=seg, pos=pos, lang=lang: jax.jit(lambda *a: module.apply(
      {"params": params}, a[0], language_ids=a[1], segment_ids=a[2], positions=a[3], train=train,
      mutable=["moe"])[0])(ids, lang, seg, pos)
  base = run(ids)
  changed = run(ids.at[0, 6:11].set((ids[0, 6:11] + 7) % 128))
  assert np.abs(np.asarray(changed[0, 6:11] - base[0, 6:11])).max() > 1e-3
  # other data in the masked positions: at most f32 reorderings (a leak moves logits by >1e-2)
  assert_close(changed[0, :6], base[0, :6], dtype=np.float32, terms=net_terms(c))
  assert_close(changed[0, 11:], base[0, 11:], dtype=np.float32, terms=net_terms(c))
  # a packed segment computes what it computes alone at the start of a row (other shapes: reordered)
  alone = run(ids[:, 11:], jnp.ones((1, 5), jnp.int32), jnp.arange(5)[None], lang[:, 11:])
  assert_close(base[0, 11:], alone[0], dtype=np.float32, terms=net_terms(c))


@pytest.mark.slow
def test_positions_enter_through_rope():
  c = make_config()
  module, params = init(c)
  ids = tokens(3)
  apply = lambda pos: run(module, params, ids, positions=pos)[0]
  base = apply(jnp.broadcast_to(jnp.arange(S), (B, S)))
  shifted = apply(jnp.broadcast_to(jnp.arange(S) + 5, (B, S)))      # RoPE is relative
  # f32 rotation angles pos * freq round to eps * pos (pos < S + 5): like (S + 5)**2 more terms
  assert_close(shifted, base, dtype=np.float32, terms=net_terms(c) + (S + 5) ** 2)
  spread = apply(jnp.broadcast_to(jnp.arange(S) * 3, (B, S)))
  assert np.abs(np.asarray(spread - base))[:, 1:].max() > 1e-2
  # first token sees only itself (position 0 in both); other batch contents may reorder
  assert_close(spread[:, 0], base[:, 0], dtype=np.float32, terms=net_terms(c))


@pytest.mark.slow
def test_bf16_compute_close_to_fp32():
  c = make_config()
  module, params = init(c)
  ids = tokens(4)
  ref, _ = run(module, params, ids)
  got, _ = run(build_model(make_config(dtype="bfloat16")), params, ids)
  assert got.dtype == jnp.float32
  err = np.abs(np.asarray(got - ref)).max()
  # about 10 roundings to bf16 per layer (norm, q/k/v, attention, o, gate/up, product, down)
  bound = tolerance(jnp.bfloat16, np.abs(np.asarray(ref)).max(), terms=10 * c.model.num_layers)["atol"]
  assert 0 < err < bound, (err, bound)


@pytest.mark.slow
def test_analysis_sows_chosen_experts():
  c = make_config("moe_layers=last:2")
  c.moe.analysis = True
  module, params = init(c)
  seg = jnp.ones((B, S), jnp.int32).at[1, -3:].set(0)
  _, state = run(module, params, tokens(5), True, language_ids=LANG, segment_ids=seg)
  assert set(state["moe"]) == {"layers_1", "layers_2"}
  chosen = np.asarray(state["moe"]["layers_2"]["chosen_experts"][0])
  assert chosen.shape == (B, S, 2) and chosen.dtype == np.int32
  fam = languages.expert_map("family7")[np.asarray(LANG)]
  real = np.asarray(seg) == 1
  assert ((chosen == fam[..., None]).any(-1) | ~real).all()     # hybrid: family expert chosen
  assert (chosen[~real] == -1).all() and (chosen[real] >= 0).all()
  metrics = moe_metrics(state["moe"])
  assert set(metrics) == {f"moe/layer_{i}/{k}" for i in (1, 2)
                          for k in ("load", "drop_fraction", "entropy", "aux_loss", "z_loss")}
  assert_close(np.sum(metrics["moe/layer_1/load"]), 1.0, dtype=np.float32, terms=7)   # 7 f32 fractions
  c.moe.aux_loss_weight, c.moe.z_loss_weight = 0.5, 0.01
  want = sum(0.5 * state["moe"][n]["aux_loss"][0] + 0.01 * state["moe"][n]["z_loss"][0]
             for n in ("layers_1", "layers_2"))
  assert_close(moe_aux_loss(state["moe"], c), want, dtype=np.float32, terms=4)    # a sum of 4 f32 terms


def test_missing_language_ids_fail_clearly():
  # abstract evaluation (no compile): the checks happen while tracing
  ids = jax.ShapeDtypeStruct((B, S), jnp.int32)
  module = build_model(make_config("routing=language"))
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), ids)   # init needs no language ids
  with pytest.raises(ValueError, match="language_ids .* required"):
    jax.eval_shape(module.apply, shapes, ids)
  jax.eval_shape(functools.partial(module.apply, language_ids=LANG), shapes, ids)
  module = build_model(make_config())
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), ids)
  with pytest.raises(ValueError, match="language_ids"):
    jax.eval_shape(functools.partial(module.apply, train=True, mutable=["moe"]), shapes, ids)
  jax.eval_shape(module.apply, shapes, ids)     # hybrid inference: plain top-k, no ids


def restack(unscanned, config):
  out = {k: v for k, v in unscanned.items() if not k.startswith("layers_")}
  for p in layer_plan(from_config(config)):
    blocks = [unscanned[f"layers_{i}"] for i in range(p["start"], p["start"] + p["count"])]
    out[p["name"]] = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *blocks) if p["stacked"] else blocks[0]
  return out


@pytest.mark.slow
def test_scan_and_unrolled_layers_agree():
  c = make_config("moe_layers=1", num_layers=4)
  c.model.scan_layers = False
  flat_module, flat = init(c, seed=3)
  c2 = make_config("moe_layers=1", num_layers=4)
  scan_module = build_model(c2)
  scanned = restack(flat, c2)
  assert scanned["layers_0"]["self_attn"]["q_proj"]["kernel"].shape == (1, 32, 32)
  assert scanned["layers_2"]["self_attn"]["q_proj"]["kernel"].shape == (2, 32, 32)
  ids = tokens(6)
  # scan vs a Python loop over the layers: XLA may fuse (and so reorder) the layers differently
  assert_close(run(scan_module, scanned, ids)[0], run(flat_module, flat, ids)[0], dtype=np.float32,
               terms=net_terms(c2))


def _loss_and_grads(c, params, ids):
  module = build_model(c)
  def loss(p):
    logits, _ = module.apply({"params": p}, ids, language_ids=LANG, train=True, mutable=["moe"])
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits
  return jax.jit(jax.grad(loss, has_aux=True))(params)


@pytest.mark.slow
def test_remat_gives_identical_logits_and_grads():
  c = make_config(num_layers=2)       # one scanned dense layer + one MoE layer: both rematted
  _, params = init(c)
  ids = tokens(7)
  g_ref, l_ref = _loss_and_grads(c, params, ids)
  assert max(float(jnp.abs(x).max()) for x in jax.tree_util.tree_leaves(g_ref)) > 0
  for policy in ("full", "dots"):
    g, l = _loss_and_grads(make_config(remat=policy, num_layers=2), params, ids)
    assert_close(l, l_ref, dtype=np.float32, terms=net_terms(c))   # same math; XLA may fuse differently
    for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_ref)):
      # backward: the contractions again, a log-softmax over V and sums over the B*S tokens
      assert_close(a, b, dtype=np.float32, terms=2 * net_terms(c) + c.model.vocab_size + B * S)


@pytest.mark.slow
def test_expert_padding_matches_unpadded():
  c = make_config()
  c.moe.impl, c.moe.capacity_factor = "capacity", 1.0   # drops happen; capacity counts real experts
  _, params = init(c)
  cp = make_config()
  cp.moe.impl, cp.moe.capacity_factor, cp.moe.expert_multiple = "capacity", 1.0, 8
  shapes = jax.eval_shape(build_model(cp).init, jax.random.PRNGKey(0), jnp.zeros((B, S), jnp.int32))
  assert shapes["params"]["layers_2"]["mlp"]["experts"]["gate_proj"].value.shape == (8, 32, 48)
  exp = moe._expert_init(0.1, 7)(jax.random.PRNGKey(0), (8, 3, 4))
  assert float(jnp.abs(exp[7]).max()) == 0.0 and float(jnp.abs(exp[6]).min()) > 0
  padded = jax.tree_util.tree_map(lambda x: x, params)
  for name in ("layers_2",):
    padded[name]["mlp"]["experts"] = jax.tree_util.tree_map(
        lambda w: jnp.concatenate([w, jnp.zeros_like(w[:1])]), params[name]["mlp"]["experts"])
  ids = tokens(8)
  for train in (False, True):
    go = lambda conf, p: run(build_model(conf), p, ids, train, language_ids=LANG)
    (a, sa), (b, sb) = go(c, params), go(cp, padded)
    # 8 expert slots instead of 7: other dispatch shapes, so other f32 orders
    assert_close(b, a, dtype=np.float32, terms=net_terms(c))
    for key in ("load", "drop_fraction", "aux_loss"):   # means over the B*S tokens, sums over the experts
      assert_close(sb["moe"]["layers_2"][key][0], sa["moe"]["layers_2"][key][0], dtype=np.float32,
                   terms=B * S + 8, err_msg=key)
  assert float(sa["moe"]["layers_2"]["drop_fraction"][0]) > 0
