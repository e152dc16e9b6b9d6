"""Same logits and gradients on 1 device and on 8 simulated devices, for several mesh shapes.

Includes expert axes 2, 4 and 8: the 7 family experts are padded to 8 (never routed to), the
expert weights are sharded over `expert`. Both MoE implementations: dropless (the default;
shard_map over the batch axes; moe.dispatch=auto: gather_tokens, the expert-parallel dispatch,
on the meshes with an expert axis, gather_weights on fsdp=8) on every mesh, capacity (dispatched activations sharded over
`expert`, tight capacity so some assignments are dropped) on the 2x2x2x1 mesh.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apollo_jax import config as cfg
from apollo_jax.runtime import sharding
from apollo_jax.model.transformer import build_model
from tolerance import assert_close, network_terms

MESHES = [  # (data, fsdp, expert, tensor)
    (2, 2, 2, 1),
    (1, 1, 8, 1),
    (1, 2, 4, 1),
    (1, 8, 1, 1),
    (2, 1, 2, 2),
]


CAPACITY_MESHES = [MESHES[0]]       # data, fsdp and expert axes at once (test time)


def tiny_config(impl="dropless"):
  c = cfg.load("tiny")
  c.moe.impl = impl
  c.model.vocab_size = 256
  c.moe.expert_multiple = 8          # same padded parameter shapes on every mesh
  c.moe.group_size = 16              # several groups per row, so groups are split across devices
  c.moe.capacity_factor = 1.0        # tight: some assignments are dropped, identically everywhere
  return c


def batch(rng, b=8, s=32, vocab=256):
  k1, k2, k3 = jax.random.split(rng, 3)
  ids = jax.random.randint(k1, (b, s), 0, vocab)
  lang = jax.random.randint(k2, (b, 1), 0, 50) * jnp.ones((1, s), jnp.int32)
  # two packed samples per row and a padded tail
  seg = jnp.where(jnp.arange(s) < s // 2, 1, 2) * (jnp.arange(s) < s - 4)
  seg = jnp.broadcast_to(seg, (b, s)).astype(jnp.int32)
  pos = jnp.where(jnp.arange(s) < s // 2, jnp.arange(s), jnp.arange(s) - s // 2)
  pos = jnp.broadcast_to(pos, (b, s)).astype(jnp.int32)
  targets = jax.random.randint(k3, (b, s), 0, vocab)
  return dict(input_ids=ids, language_ids=lang, segment_ids=seg, positions=pos, targets=targets)


def param_specs(config, mesh, ids_shape):
  """(boxed abstract variables, param NamedShardings) of build_model(config) on `mesh`."""
  module = build_model(config, mesh)
  with sharding.activate(mesh):
    abstract = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), jnp.zeros(ids_shape, jnp.int32)))
    return abstract, sharding.param_shardings(abstract, mesh)["params"]


def run(config, mesh, params, b):
  """Eval logits, and the train-mode loss and gradients, computed on `mesh`."""
  module = build_model(config, mesh)
  _, p_sh = param_specs(config, mesh, b["input_ids"].shape)
  with sharding.activate(mesh):
    b_sh = sharding.batch_sharding(mesh)
    params = jax.device_put(params, p_sh)
    bb = jax.device_put(b, b_sh)

    def loss_fn(p, bb):
      logits, state = module.apply({"params": p}, bb["input_ids"], language_ids=bb["language_ids"],
                                   segment_ids=bb["segment_ids"], positions=bb["positions"],
                                   train=True, mutable=["moe"])
      logp = jax.nn.log_softmax(logits)
      nll = -jnp.take_along_axis(logp, bb["targets"][..., None], -1)[..., 0]
      return jnp.mean(nll * (bb["segment_ids"] > 0)), state

    grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True), in_shardings=(p_sh, b_sh))
    (loss, state), grads = grad_fn(params, bb)
    logits = jax.jit(lambda p, x: module.apply({"params": p}, x), in_shardings=(p_sh, b_sh))(
        params, bb["input_ids"])
    return (np.asarray(logits), float(loss), jax.tree.map(np.asarray, grads),
            jax.tree.map(np.asarray, state["moe"]))


@pytest.fixture(scope="module", params=["dropless", "capacity"])
def reference(request):
  config = tiny_config(request.param)
  module = build_model(config)
  b = batch(jax.random.PRNGKey(1))
  params = nn.meta.unbox(module.init(jax.random.PRNGKey(0), b["input_ids"]))["params"]
  config.mesh.update(data=1, fsdp=1, expert=1, tensor=1)
  mesh = sharding.make_mesh(config, jax.devices()[:1])
  return config, params, b, run(config, mesh, params, b)


@pytest.mark.slow
@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_same_logits_and_grads_on_8_devices(reference, shape):
  config, params, b, (logits1, loss1, grads1, moe1) = reference
  if config.moe.impl == "capacity" and shape not in CAPACITY_MESHES:
    pytest.skip("capacity is checked on one mesh with data, fsdp and expert axes (test time)")
  config = config.copy_and_resolve_references()
  config.mesh.update(dict(zip(cfg.MESH_AXES, shape)))
  cfg.validate(config, 8)
  mesh = sharding.make_mesh(config)
  assert dict(mesh.shape) == dict(zip(cfg.MESH_AXES, shape))
  logits8, loss8, grads8, moe8 = run(config, mesh, params, b)
  # the mesh reorders every f32 reduction of the 4 layers (d_model 64, d_ff 128); the loss adds
  # a log-softmax over V=256 and a mean over the 256 tokens
  net, tokens = network_terms(4, 64, 128), b["input_ids"].size
  assert_close(logits8, logits1, dtype=np.float32, terms=net)
  assert_close(loss8, loss1, dtype=np.float32, terms=net + 256 + tokens)
  flat1 = jax.tree_util.tree_flatten_with_path(grads1)[0]
  flat8 = jax.tree.leaves(grads8)
  for (path, g1), g8 in zip(flat1, flat8):   # backward: the same contractions again, sums over tokens
    assert_close(g8, g1, dtype=np.float32, terms=2 * net + 256 + 2 * tokens, err_msg=jax.tree_util.keystr(path))
  for a, b8 in zip(jax.tree.leaves(moe1), jax.tree.leaves(moe8)):   # same routing decisions
    # router inputs come out of the network; the statistics are means over the tokens
    assert_close(b8, a, dtype=np.float32, terms=net + tokens)


@pytest.mark.slow
def test_capacity_dropped_and_dropless_did_not(reference):
  """The comparison above covers the capacity-drop path, and dropless really drops nothing."""
  moe = reference[3][3]
  drops = [float(np.asarray(v)) for k, v in jax.tree_util.tree_flatten_with_path(moe)[0]
           if "drop_fraction" in jax.tree_util.keystr(k)]
  assert drops and (max(drops) > 0) == (reference[0].moe.impl == "capacity")


def test_expert_params_are_sharded_on_expert_axis():
  config = tiny_config()
  config.mesh.update(data=1, fsdp=2, expert=4, tensor=1)
  _, shardings = param_specs(config, sharding.make_mesh(config), (8, 16))
  flat = {jax.tree_util.keystr(p): s.spec for p, s in jax.tree_util.tree_flatten_with_path(shardings)[0]}
  expert_specs = [s for k, s in flat.items() if "experts" in k]
  assert expert_specs and all(s[0] == "expert" for s in expert_specs)
  assert all("fsdp" in tuple(s) for s in expert_specs)     # and FSDP-sharded on `embed`


def test_partition_specs_of_the_released_shape():
  """Golden PartitionSpecs of Apollo-MoE-0.5B on a data=1, fsdp=2, expert=2, tensor=2 mesh
  (abstract: nothing is allocated)."""
  from jax.sharding import PartitionSpec as P
  config = cfg.load("apollo_moe_0p5b")
  config.mesh.update(data=1, fsdp=2, expert=2, tensor=2)
  abstract, specs = param_specs(config, sharding.make_mesh(config), (1, 8))
  got = {jax.tree_util.keystr(p, simple=True, separator="/"): s.spec
         for p, s in jax.tree_util.tree_flatten_with_path(specs)[0]}
  fsdp = ("fsdp", "expert")          # outside the experts, the expert axis is more FSDP
  want = {
      "embed_tokens/embedding": P("tensor", fsdp),
      "layers_0/self_attn/q_proj/kernel": P(None, fsdp, "tensor"),       # 22 stacked dense layers
      "layers_0/self_attn/q_proj/bias": P(None, "tensor"),
      "layers_0/self_attn/o_proj/kernel": P(None, "tensor", fsdp),
      "layers_0/mlp/down_proj/kernel": P(None, "tensor", fsdp),
      "layers_0/input_layernorm/scale": P(None, None),
      "layers_22/mlp/gate/kernel": P(fsdp, None),
      "layers_22/mlp/experts/gate_proj": P("expert", "fsdp", "tensor"),
      "layers_23/mlp/experts/down_proj": P("expert", "tensor", "fsdp"),
      "norm/scale": P(None),
  }
  for name, spec in want.items():
    assert got[name] == spec, (name, got[name])
  assert "lm_head/kernel" not in got                                   # tied embeddings
  assert abstract["params"]["layers_22"]["mlp"]["experts"]["up_proj"].value.shape == (8, 896, 4864)
