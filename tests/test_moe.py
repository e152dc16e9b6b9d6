"""MoE block vs an independent loop-over-experts reference (numpy forward, jnp dense grads), for
both implementations (dropless default, capacity), plus the old one-hot einsum capacity dispatch."""

import importlib.util
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apollo_jax import config as cfg
from apollo_jax.model import dropless, moe, routing
from apollo_jax.model.config import from_config
from tolerance import assert_close, violation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B, S, M = 2, 8, 16


def make_config(**moe_fields):
  spec = importlib.util.spec_from_file_location("tiny", os.path.join(ROOT, "configs/tiny.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  c.model.hidden_size, c.model.intermediate_size = M, 24
  c.moe.router_init_std = 1.0        # decisive routing (not the near-uniform 0.02 init)
  c.moe.group_size = 16
  c.moe.capacity_factor = 0.0        # no drops unless a test asks for them
  c.moe.expert_multiple = 1
  for k, v in moe_fields.items():
    c.moe[k] = v
  return c


def init_block(c, seed=0):
  block = moe.MoEBlock(from_config(c))
  x = jax.random.normal(jax.random.PRNGKey(seed + 1), (B, S, M))
  params = nn.meta.unbox(block.init(jax.random.PRNGKey(seed), x, jnp.ones((B, S), jnp.int32)))["params"]
  return block, params, x


# f32 roundings feeding one MoE output: router and gate/up over M, softmax over the 7 experts,
# down over the intermediate 24, the weighted sum of <= 3 experts; gradients walk the chain again
TERMS = 2 * M + 7 + 24 + 3
FAMILY = np.array([[0, 3, -1, 6, 2, 2, -1, 5], [1, 1, 4, -1, 0, 6, 3, 3]], np.int32)


# ---------------------------------------------------------------- independent reference
def np_choices(probs, k, mode, family):
  """Per token: list of (expert, weight-or-None, is_family); None = take the router prob."""
  out = []
  for p, f in zip(probs, family):
    order = list(np.argsort(-p, kind="stable")[:k])
    if mode == "language" and f >= 0:
      out.append([(f, 1.0, True)])
      continue
    if mode == "hybrid" and f >= 0 and f not in order:
      order[-1] = f
    fam = mode in ("hybrid", "language") and f >= 0
    out.append([(e, None, fam and e == f) for e in order])
  return out


def np_swiglu(x, g, u, d):
  a = x @ g
  return ((a / (1 + np.exp(-a))) * (x @ u)) @ d


def np_moe(params, x, family, mode, k, norm=False, shared=False, capacity=None, group=S * B,
           seg=None):
  """float64 loop-over-experts MoE with an explicit per-group priority queue for capacity."""
  p = {key: np.asarray(v, np.float64) for key, v in _flat(params).items()}
  x = np.asarray(x, np.float64).reshape(-1, M)
  family = np.asarray(family).reshape(-1)
  seg = np.ones(len(x), int) if seg is None else np.asarray(seg).reshape(-1)
  logits = x @ p["gate/kernel"]
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  choices = np_choices(probs, k, mode, family)
  kept, total, dropped = {}, 0, 0
  for g0 in range(0, len(x), group):                    # queue: (level, token) per group
    queue = []
    for t in range(g0, g0 + group):
      if seg[t] == 0:
        continue
      for slot, (e, _, fam) in enumerate(choices[t]):
        queue.append((0 if fam else 1 + slot, t, slot, e))
    count = {}
    for level, t, slot, e in sorted(queue):
      total += 1
      if capacity is None or count.get(e, 0) < capacity:
        count[e] = count.get(e, 0) + 1
        kept[(t, slot)] = True
      else:
        dropped += 1
  y = np.zeros_like(x)
  for t in range(len(x)):
    ws = [probs[t, e] if w is None else w for e, w, _ in choices[t]]
    if norm and mode != "language":
      ws = [w / sum(ws) for w in ws]
    for slot, (e, _, _) in enumerate(choices[t]):
      if kept.get((t, slot)):
        y[t] += ws[slot] * np_swiglu(x[t], p["experts/gate_proj"][e], p["experts/up_proj"][e],
                                     p["experts/down_proj"][e])
    if shared:
      s = 1 / (1 + np.exp(-(x[t] @ p["shared_expert_gate/kernel"])))
      y[t] += s * np_swiglu(x[t], p["shared_expert/gate_proj/kernel"],
                            p["shared_expert/up_proj/kernel"], p["shared_expert/down_proj/kernel"])
  return y.reshape(B, S, M), choices, dropped / max(total, 1)


def _flat(params):
  return {"/".join(k.key for k in path): v for path, v in jax.tree_util.tree_leaves_with_path(params)}


def jnp_dense_loss(params, x, choices, mode, norm, shared, r):
  """sum(r * MoE(x)) computed densely (every expert on every token, weighted by a [N, E] matrix
  built from the fixed choices), in jnp so jax.grad gives the reference gradients."""
  p = _flat(params)
  xf = x.reshape(-1, M)
  probs = jax.nn.softmax(xf @ p["gate/kernel"], axis=-1)
  n, E = probs.shape
  sel = np.zeros((n, E))       # 1 where the weight is the router prob
  const = np.zeros((n, E))     # fixed weights (language mode)
  for t, ch in enumerate(choices):
    for e, w, _ in ch:
      (const if w is not None else sel)[t, e] = 1.0 if w is None else w
  wmat = probs * sel
  if norm and mode != "language":
    wmat = wmat / jnp.sum(wmat, -1, keepdims=True)
  wmat = wmat + const
  g, u, d = p["experts/gate_proj"][:E], p["experts/up_proj"][:E], p["experts/down_proj"][:E]
  h = jax.nn.silu(jnp.einsum("NM,EMH->NEH", xf, g)) * jnp.einsum("NM,EMH->NEH", xf, u)
  y = jnp.einsum("NE,NEM->NM", wmat, jnp.einsum("NEH,EHM->NEM", h, d))
  if shared:
    y = y + jax.nn.sigmoid(xf @ p["shared_expert_gate/kernel"]) * (
        (jax.nn.silu(xf @ p["shared_expert/gate_proj/kernel"]) * (xf @ p["shared_expert/up_proj/kernel"]))
        @ p["shared_expert/down_proj/kernel"])
  return jnp.sum(y.reshape(r.shape) * r)


FAST_CASES = ("hybrid_train", "language_k2", "hybrid_eval", "hybrid_train_gmm")     # the fast tier (-m "not slow"); CI runs all
CASES = {  # name: (config fields, train, reference mode)
    "hybrid_train": (dict(routing="hybrid"), True, "hybrid"),
    "hybrid_eval": (dict(routing="hybrid"), False, "topk"),
    "topk": (dict(routing="topk"), True, "topk"),
    "topk_norm": (dict(routing="topk", norm_topk_prob=True), False, "topk"),
    "language_shared": (dict(routing="language", top_k=1, shared_expert=True), True, "language"),
    "language_k2": (dict(routing="language", top_k=2), False, "language"),
    "capacity_hybrid_train": (dict(routing="hybrid", impl="capacity"), True, "hybrid"),
    "hybrid_train_gmm": (dict(routing="hybrid", kernel="gmm"), True, "hybrid"),    # Pallas interpret mode
}


@pytest.mark.parametrize("name", [n if n in FAST_CASES else pytest.param(n, marks=pytest.mark.slow)
                                  for n in CASES])
def test_moe_matches_reference_forward_and_grads(name):
  fields, train, mode = CASES[name]
  c = make_config(**fields)
  block, params, x = init_block(c)
  fam = jnp.asarray(FAMILY)
  seg = jnp.ones((B, S), jnp.int32)
  y, stats = block.apply({"params": params}, x, seg, fam, train)
  want, choices, _ = np_moe(params, x, FAMILY, mode, c.moe.top_k, c.moe.norm_topk_prob,
                            c.moe.shared_expert)
  assert_close(y, want, dtype=np.float32, terms=TERMS)      # vs the float64 loop
  assert float(stats["drop_fraction"]) == 0.0
  n_assign = sum(len(ch) for ch in choices)
  load = np.bincount([e for ch in choices for e, _, _ in ch], minlength=7) / n_assign
  assert_close(stats["load"], load, dtype=np.float32, terms=n_assign)   # a mean over the assignments
  if mode == "hybrid":   # every token with a family expert uses it
    assert all(any(e == f for e, _, _ in ch) for ch, f in zip(choices, FAMILY.ravel()) if f >= 0)

  r = jax.random.normal(jax.random.PRNGKey(7), (B, S, M))
  loss = lambda p, x: jnp.sum(block.apply({"params": p}, x, seg, fam, train)[0] * r)
  got_p, got_x = jax.grad(loss, argnums=(0, 1))(params, x)
  ref = lambda p, x: jnp_dense_loss(p, x, choices, mode, c.moe.norm_topk_prob, c.moe.shared_expert, r)
  want_p, want_x = jax.grad(ref, argnums=(0, 1))(params, x)
  # sparse dispatch vs every expert on every token, both f32; weight grads also sum over B*S tokens
  assert_close(got_x, want_x, dtype=np.float32, terms=2 * TERMS)
  for key, g in _flat(got_p).items():
    assert_close(g, _flat(want_p)[key], dtype=np.float32, terms=2 * TERMS + B * S, err_msg=key)
  if mode == "language":   # weight 1 is a constant: the router gets no gradient (as the original)
    fallback = (FAMILY < 0).any()
    assert fallback == bool(np.abs(_flat(got_p)["gate/kernel"]).max() > 0)


@pytest.mark.slow
def test_tight_capacity_drops_exactly_as_reference():
  c = make_config(routing="hybrid", capacity_factor=0.5, min_capacity=1, group_size=8, impl="capacity")
  block, params, x = init_block(c, seed=3)
  C = cfg.capacity(8, 7, 2, 0.5, 1)
  assert C == 2
  seg = jnp.ones((B, S), jnp.int32)
  y, stats = block.apply({"params": params}, x, seg, jnp.asarray(FAMILY), True)
  want, choices, drop = np_moe(params, x, FAMILY, "hybrid", 2, capacity=C, group=8)
  assert drop > 0.1
  assert_close(y, want, dtype=np.float32, terms=TERMS)
  assert_close(stats["drop_fraction"], drop, dtype=np.float32, terms=B * S * 2)   # a mean over the assignments
  # a token whose every assignment is dropped contributes exactly zero
  ref_zero = np.all(want == 0, axis=-1)
  assert ref_zero.any()
  np.testing.assert_array_equal(np.asarray(y)[ref_zero], 0.0)


def test_padding_tokens_are_not_routed_and_use_no_capacity():
  c = make_config(routing="topk", capacity_factor=0.5, min_capacity=1, group_size=8, impl="capacity")
  block, params, x = init_block(c, seed=5)
  seg = np.ones((B, S), np.int32)
  seg[:, :4] = 0                        # padding first: it would take all slots if it were routed
  y, stats = block.apply({"params": params}, x, jnp.asarray(seg), None, True)
  want, _, drop = np_moe(params, x, FAMILY, "topk", 2, capacity=2, group=8, seg=seg)
  assert_close(y, want, dtype=np.float32, terms=TERMS)
  np.testing.assert_array_equal(np.asarray(y)[seg == 0], 0.0)
  assert_close(stats["drop_fraction"], drop, dtype=np.float32, terms=B * S * 2)   # a mean over the assignments
  unpadded_tokens_kept = np.abs(np.asarray(y)[seg == 1]).sum(-1) > 0
  assert unpadded_tokens_kept.sum() >= 4


def _brute_group(B_, S_, gs):
  cands = [g for g in range(1, B_ * S_ + 1)
           if (S_ % g == 0 or (g % S_ == 0 and (B_ * S_) % g == 0)) and g <= max(gs, 1)]
  return max(cands)


def test_group_shape():
  assert moe.group_shape(4, 8, 16) == (2, 16)     # groups of two whole rows
  assert moe.group_shape(4, 8, 12) == (4, 8)      # 12 is neither: one row per group
  assert moe.group_shape(3, 8, 20) == (3, 8)      # 16 does not divide 24 tokens
  assert moe.group_shape(2, 6, 4) == (4, 3)       # part of a row
  assert moe.group_shape(2, 4096, 1024) == (8, 1024)
  for B_ in range(1, 7):
    for S_ in range(1, 13):
      for gs in (1, 2, 3, 5, 8, 16, 100):
        G, g = moe.group_shape(B_, S_, gs)
        assert G * g == B_ * S_ and g == _brute_group(B_, S_, gs), (B_, S_, gs, G, g)


@pytest.mark.slow
def test_dropless_keeps_a_single_family_group_that_capacity_drops():
  """Every token in one family (a monolingual group): Hybrid-k forces all of them onto that
  expert, which overflows capacity factor 2 (C = 10 of 16 tokens); dropless computes every
  assignment, = the reference, and does not route padding (chosen -1, output 0)."""
  fam = np.full((B, S), 4, np.int32)
  seg = np.ones((B, S), np.int32)
  seg[1, -3:] = 0
  c = make_config(routing="hybrid", analysis=True)
  block, params, x = init_block(c, seed=11)
  y, stats = block.apply({"params": params}, x, jnp.asarray(seg), jnp.asarray(fam), True)
  want, _, _ = np_moe(params, x, fam, "hybrid", 2, seg=seg)
  assert_close(y, want, dtype=np.float32, terms=TERMS)
  assert float(stats["drop_fraction"]) == 0.0
  chosen = np.asarray(stats["chosen_experts"])
  assert (chosen[seg == 0] == -1).all() and (chosen[seg == 1] == 4).any(-1).all()
  np.testing.assert_array_equal(np.asarray(y)[seg == 0], 0.0)
  capacity = make_config(routing="hybrid", impl="capacity", capacity_factor=2.0)
  _, cap_stats = moe.MoEBlock(from_config(capacity)).apply({"params": params}, x, jnp.asarray(seg), jnp.asarray(fam), True)
  assert float(cap_stats["drop_fraction"]) > 0.1


def old_einsum_capacity(params, c, x, seg, fam):
  """The capacity MoE as it was before gather/scatter (one-hot [G,S,E,C] einsums), training mode."""
  e, K, E = c.moe, c.moe.top_k, c.moe.num_experts
  G, gs = moe.group_shape(B, S, e.group_size)
  x_GSM = x.reshape(G, gs, M)
  probs = routing.router_probs(x_GSM @ params["gate"]["kernel"], E)
  idx, w, valid, is_fam = routing.route(probs, K, e.routing, fam.reshape(G, gs), num_real=E)
  valid = valid & (seg != 0).reshape(G, gs)[..., None]
  C = cfg.capacity(gs, E, K, e.capacity_factor, e.min_capacity)
  pos = routing.capacity_positions(idx, valid, routing.priority_levels(is_fam), E)
  keep = valid & (pos < C)
  e_hot = jax.nn.one_hot(idx, E) * keep[..., None]
  c_hot = jax.nn.one_hot(jnp.where(keep, pos, -1), C)
  hi = jax.lax.Precision.HIGHEST
  dispatch = jnp.einsum("GSKE,GSKC->GSEC", e_hot, c_hot, precision=hi)
  combine = jnp.einsum("GSKE,GSKC->GSEC", e_hot * w[..., None], c_hot, precision=hi)
  ex = params["experts"]
  x_EGCM = jnp.einsum("GSEC,GSM->EGCM", dispatch, x_GSM)
  h = jax.nn.silu(jnp.einsum("EGCM,EMH->EGCH", x_EGCM, ex["gate_proj"])) * jnp.einsum(
      "EGCM,EMH->EGCH", x_EGCM, ex["up_proj"])
  y = jnp.einsum("EGCH,EHM->EGCM", h, ex["down_proj"])
  return jnp.einsum("GSEC,EGCM->GSM", combine, y).reshape(B, S, M)


@pytest.mark.slow
def test_capacity_gather_scatter_equals_the_old_einsums():
  c = make_config(routing="hybrid", impl="capacity", capacity_factor=0.75, min_capacity=1, group_size=8)
  block, params, x = init_block(c, seed=13)
  seg = np.ones((B, S), np.int32)
  seg[0, :2] = 0
  seg, fam = jnp.asarray(seg), jnp.asarray(FAMILY)
  y, stats = block.apply({"params": params}, x, seg, fam, True)
  assert float(stats["drop_fraction"]) > 0.05
  # gather/scatter vs one-hot einsums (exact 0/1 products): the expert FFN's f32 orders differ
  assert_close(y, old_einsum_capacity(params, c, x, seg, fam), dtype=np.float32, terms=TERMS)
  r = jax.random.normal(jax.random.PRNGKey(3), (B, S, M))
  new = jax.grad(lambda p, x: jnp.sum(block.apply({"params": p}, x, seg, fam, True)[0] * r), argnums=(0, 1))
  old = jax.grad(lambda p, x: jnp.sum(old_einsum_capacity(p, c, x, seg, fam) * r), argnums=(0, 1))
  for (path, g), want in zip(jax.tree_util.tree_leaves_with_path(new(params, x)),
                             jax.tree.leaves(old(params, x))):
    assert_close(g, want, dtype=np.float32, terms=2 * TERMS + B * S, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("kernel,block", [pytest.param("blocks", 4, marks=pytest.mark.slow), ("blocks", 32),
                                          ("ragged", 1), ("gmm", 16), ("einsum", 32)])
def test_dropless_kernels_equal_loop_over_experts(kernel, block):
  """moe_ffn with invalid slots, empty experts (one inside the sort order, one last) and odd-sized
  groups, each kernel (gmm in Pallas interpret mode) = a loop over the experts, each computing only
  the tokens routed to it: forward and the gradients of x, the routing weights and wg, wu, wd."""
  N, M_, I, E, K, empty = 150, 32, 48, 7, 2, [2, 6]
  k = jax.random.split(jax.random.PRNGKey(0), 6)
  x = jax.random.normal(k[0], (N, M_))
  wg, wu = (jax.random.normal(kk, (E, M_, I)) * 0.3 for kk in k[1:3])
  wd = jax.random.normal(k[3], (E, I, M_)) * 0.3
  logits = 2 * jax.random.normal(k[4], (N, E)) + jnp.zeros(E).at[jnp.array(empty)].set(-jnp.inf)
  w, idx = jax.lax.top_k(jax.nn.softmax(logits), K)
  valid = jax.random.uniform(k[5], (N, K)) > 0.2
  idx_np, valid_np = np.asarray(idx), np.asarray(valid)
  counts = np.bincount(idx_np[valid_np], minlength=E)
  assert (counts[empty] == 0).all() and (counts % 2 == 1).sum() >= 2 and (counts > block).any()

  def ref(x, w, wg, wu, wd):
    y = jnp.zeros_like(x)
    for e in range(E):
      tok, slot = np.nonzero((idx_np == e) & valid_np)           # expert e's tokens only
      if len(tok):
        h = jax.nn.silu(x[tok] @ wg[e]) * (x[tok] @ wu[e])
        y = y.at[tok].add(w[tok, slot][:, None] * (h @ wd[e]))
    return y

  got = jax.jit(lambda *a: dropless.moe_ffn(a[0], idx, a[1], valid, *a[2:], kernel=kernel, block=block,
                                            interpret=True))     # jit: interpret mode is slow eagerly
  args = (x, w, wg, wu, wd)
  terms = M_ + I + K                 # f32 gate/up over M, down over I, the sum over the K slots
  assert_close(got(*args), ref(*args), dtype=np.float32, terms=terms)
  # negative control: experts 0 and 1 swapped (a wrong shard) is far outside the bound
  swap = lambda a: a[jnp.array([1, 0, *range(2, E)])]
  assert violation(got(x, w, swap(wg), swap(wu), swap(wd)), ref(*args), dtype=np.float32, terms=terms) > 100
  r = jax.random.normal(jax.random.PRNGKey(9), (N, M_))
  grads = lambda f: jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) * r), argnums=tuple(range(5))))(*args)
  for name, g, want in zip(("x", "w", "wg", "wu", "wd"), grads(got), grads(ref)):
    assert_close(g, want, dtype=np.float32, terms=2 * terms + N, err_msg=name)   # + sums over the N tokens


@pytest.mark.parametrize("kernel", dropless.KERNELS)
def test_rows_past_the_groups_are_zero_with_zero_gradient(kernel):
  """grouped_swiglu on the sorted rows: the rows past the last expert's run (gmm never writes
  them) come out 0, and so does their gradient; everything is finite."""
  N, K, E, b = 24, 2, 3, 8
  idx = jax.random.randint(jax.random.PRNGKey(0), (N, K), 0, E)
  plan = dropless.sort_plan(idx, jnp.arange(N * K).reshape(N, K) % 3 > 0, E, 1 if kernel == "ragged" else b)
  x_rows = dropless.dispatch(jax.random.normal(jax.random.PRNGKey(1), (N, M)), plan)
  ws = [jax.random.normal(jax.random.PRNGKey(i), shape) for i, shape in
        enumerate(((E, M, 16), (E, M, 16), (E, 16, M)), 2)]

  def value_and_grad(x):
    y, back = jax.vjp(lambda x: dropless.grouped_swiglu(x, plan, *ws, kernel, interpret=True), x)
    return y, back(jnp.ones_like(y))[0]

  y, dx = jax.jit(value_and_grad)(x_rows)
  used = int(jnp.sum(-(-plan.group_sizes // plan.block) * plan.block))
  assert used < len(x_rows) and np.isfinite(y).all() and np.isfinite(dx).all()
  np.testing.assert_array_equal(np.asarray(y)[used:], 0.0)
  np.testing.assert_array_equal(np.asarray(dx)[used:], 0.0)


def test_resolve_kernel_per_backend(monkeypatch):
  assert set(cfg.MOE_KERNELS) == {"auto", *dropless.KERNELS}
  assert [dropless.resolve_kernel("auto", b) for b in ("cpu", "gpu", "tpu")] == ["blocks", "blocks", "ragged"]
  for kernel in dropless.KERNELS:
    assert [dropless.resolve_kernel(kernel, b) for b in ("cpu", "tpu")] == [kernel, kernel]
  flag = "--xla_gpu_experimental_use_ragged_dot_fusion"
  refused = r"expands .*ragged_dot into a dense matmul.*ragged_dot_fusion=true.*moe\.kernel=blocks"
  for flags in ("--xla_force_host_platform_device_count=8", f"{flag}=false", f"{flag}=true {flag}=false"):
    monkeypatch.setenv("XLA_FLAGS", flags)
    with pytest.raises(ValueError, match=refused):
      dropless.resolve_kernel("ragged", "gpu")
  monkeypatch.setenv("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {flag}=true")
  assert dropless.resolve_kernel("ragged", "gpu") == "ragged"
  # the model config: validated, resolved for the backend, gmm interpreted unless built for TPU
  resolved = lambda backend, **f: (lambda m: (m.kernel, m.interpret))(from_config(make_config(**f), backend=backend).moe)
  assert resolved("cpu") == ("blocks", True) and resolved("tpu") == ("ragged", False)
  assert resolved("cpu", kernel="gmm") == ("gmm", True) and resolved("tpu", kernel="gmm") == ("gmm", False)
  monkeypatch.setenv("XLA_FLAGS", "")
  with pytest.raises(ValueError, match=refused):
    from_config(make_config(kernel="ragged"), backend="gpu")
  with pytest.raises(ValueError, match="moe.kernel='dense'"):
    from_config(make_config(kernel="dense"))


def test_gmm_lowers_to_the_mosaic_kernel_for_tpu():
  """Built for TPU on this CPU machine, the dropless MoE with moe.kernel=gmm lowers (forward and
  backward) to the real Pallas TPU kernel, a Mosaic tpu_custom_call, not the interpreter."""
  block = moe.MoEBlock(from_config(make_config(routing="topk", kernel="gmm"), backend="tpu"))
  x, seg = jnp.zeros((B, S, M)), jnp.ones((B, S), jnp.int32)
  params = jax.eval_shape(lambda: nn.meta.unbox(block.init(jax.random.PRNGKey(0), x, seg))["params"])
  loss = lambda p, x: jnp.sum(block.apply({"params": p}, x, seg, None, True)[0])
  lowered = jax.jit(jax.grad(loss, argnums=(0, 1))).trace(params, x).lower(lowering_platforms=("tpu",))
  assert "tpu_custom_call" in lowered.as_text()
