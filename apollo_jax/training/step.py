"""Train state, loss, and the jitted train/eval steps (pure functions of arrays).

Loss (as the original, docs/original.md, Training recipe): per micro-batch the token-mean fp32
cross-entropy over `loss_mask` (computed `config.loss_chunk` positions at a time, apollo_jax.loss),
averaged over the `grad_accum` micro-batches (mean of means, not a global token mean), plus
`transformer.moe_aux_loss`. Per-language-family CE sums and token counts ride along as metrics
(family = languages.expert_map('family7')[language_id]).

The state is a plain dict {"params", "opt_state", "step", "rng"} so that Orbax saves it as is.
`step` counts applied updates. The model is deterministic (no dropout); `rng` is carried (and
checkpointed) so that a stochastic feature can use fold_in(rng, step) without a format change.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from apollo_jax import languages
from apollo_jax.training import loss
from apollo_jax.training import optimizer
from apollo_jax.runtime import sharding
from apollo_jax.model import layers
from apollo_jax.model import transformer

FAMILY_OF_LANGUAGE = languages.expert_map("family7")
NUM_FAMILIES = len(languages.FAMILIES)
BATCH_KEYS = ("input_ids", "targets", "loss_mask", "segment_ids", "positions", "language_ids")


# ----------------------------------------------------------------------------- state

def state_shardings(model, config, tx, mesh):
  """(abstract state of ShapeDtypeStructs, matching NamedShardings, params init fn)."""
  ids = jnp.zeros((config.global_batch // config.grad_accum, config.data.seq_len), jnp.int32)
  boxed = transformer.abstract_variables(model, ids.shape)    # a batch the mesh's batch axes divide
  init = lambda rng: model.init(rng, ids)
  param_sh = sharding.param_shardings(boxed, mesh)["params"]
  params = transformer.unbox(boxed)["params"]
  sharding.check_divisible(params, param_sh)
  opt = jax.eval_shape(tx.init, params)
  rep = sharding.replicated(mesh)
  opt_sh = optax.tree_map_params(tx, lambda _, s: s, opt, param_sh, transform_non_params=lambda _: rep,
                                 is_leaf=lambda x: isinstance(x, NamedSharding))
  abstract = {"params": params, "opt_state": opt, "step": jax.ShapeDtypeStruct((), jnp.int32),
              "rng": jax.ShapeDtypeStruct((2,), jnp.uint32)}
  shardings = {"params": param_sh, "opt_state": opt_sh, "step": rep, "rng": rep}
  return abstract, shardings, init


def init_state(config, tx, shardings, init_fn, params=None):
  """Fresh state, created directly sharded; `params` (already sharded) replaces random init."""
  init_rng, rng = jax.random.split(jax.random.PRNGKey(config.seed))
  if params is None:
    params = jax.jit(lambda r: nn.unbox(init_fn(r))["params"],
                     out_shardings=shardings["params"])(init_rng)
  opt_state = jax.jit(tx.init, out_shardings=shardings["opt_state"])(params)
  step = jax.device_put(jnp.zeros((), jnp.int32), shardings["step"])
  return {"params": params, "opt_state": opt_state, "step": step,
          "rng": jax.device_put(rng, shardings["rng"])}


# ----------------------------------------------------------------------------- loss

def compute_params(params, config):
  """Params in the compute dtype (model.dtype), cast BEFORE the model uses them, so the FSDP
  all-gathers move bf16, not fp32. The same values the layers would cast to themselves; the
  MoE routers (`gate`) stay fp32 (fp32 routing, as the model computes it)."""
  dtype = layers.dtype_of(config.model.dtype)
  if dtype == jnp.float32:
    return params

  def cast(path, p):
    keep = any(getattr(k, "key", None) == "gate" for k in path)
    return p if keep or not jnp.issubdtype(p.dtype, jnp.floating) else p.astype(dtype)
  return jax.tree_util.tree_map_with_path(cast, params)


def forward(model, config, params, batch, train: bool):
  """Per-micro-batch loss terms: (objective, metrics dict)."""
  kwargs = dict(language_ids=batch["language_ids"], segment_ids=batch["segment_ids"],
                positions=batch["positions"], train=train, return_hidden=True)
  variables = {"params": compute_params(params, config)}
  if train:
    (x, w_MV), state = model.apply(variables, batch["input_ids"], mutable=["moe"], **kwargs)
    moe_state = state.get("moe", {})
  else:
    (x, w_MV), moe_state = model.apply(variables, batch["input_ids"], **kwargs), {}
  # every chunk uses the whole head: gather its FSDP-sharded dimension once, in the compute dtype
  # (pinned to the parameter's sharding first so the gather does not move the fp32 original)
  w_MV = nn.with_logical_constraint(w_MV, ("embed", "vocab"))
  w_MV = nn.with_logical_constraint(w_MV, ("act_embed", "vocab"))
  ce = loss.chunked_token_ce(x, w_MV, batch["targets"], config.loss_chunk)
  mask = batch["loss_mask"].astype(jnp.float32)
  ce_sum, count = jnp.sum(ce * mask), jnp.sum(mask)
  family = jax.nn.one_hot(jnp.asarray(FAMILY_OF_LANGUAGE)[batch["language_ids"]], NUM_FAMILIES)
  metrics = {"ce_sum": ce_sum, "count": count,
             "family_ce_sum": jnp.einsum("bs,bsf->f", ce * mask, family),
             "family_count": jnp.einsum("bs,bsf->f", mask, family)}
  objective = ce_sum / jnp.maximum(count, 1.0)
  aux = jnp.zeros((), jnp.float32)
  if moe_state:
    from apollo_jax.model import transformer
    aux = transformer.moe_aux_loss(moe_state, config)
    metrics.update(transformer.moe_metrics(moe_state))
  metrics["ce"], metrics["aux_loss"] = objective, aux
  return objective + aux, metrics


def split_micro_batches(batch, grad_accum: int, mesh):
  """[B, S] -> [A, B/A, S], micro-batch a = rows a, a+A, ... so each device keeps its rows."""
  def split(x):
    x = x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:]).swapaxes(0, 1)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(None, sharding.BATCH_AXES)))
  return jax.tree.map(split, batch)


# ----------------------------------------------------------------------------- steps

def make_train_step(model, config, tx, mesh):
  """state, batch -> new state, metrics (loss = mean over micro-batches; see module docstring)."""
  A = config.grad_accum
  schedule = optimizer.make_schedule(config.optim, config.steps)
  nan_at = int(config.get("debug_nan_at_step", 0) or 0)

  def train_step(state, batch):
    def micro(params, mb):
      objective, metrics = forward(model, config, params, mb, train=True)
      if nan_at > 0:    # test hook: poison update number `nan_at` (loss and grads become NaN)
        objective = objective * jnp.where(state["step"] + 1 == nan_at, jnp.nan, 1.0)
      return objective, metrics

    grad_fn = jax.value_and_grad(micro, has_aux=True)
    if A == 1:
      (loss, metrics), grads = grad_fn(state["params"], batch)
    else:
      micro_batches = split_micro_batches(batch, A, mesh)
      shapes = jax.eval_shape(grad_fn, state["params"], jax.tree.map(lambda x: x[0], micro_batches))

      def body(acc, mb):
        return jax.tree.map(jnp.add, acc, grad_fn(state["params"], mb)), None
      ((loss, metrics), grads), _ = jax.lax.scan(
          body, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes), micro_batches)
      loss, grads = loss / A, jax.tree.map(lambda g: g / A, grads)
      metrics = {k: v if k.endswith(("_sum", "count")) else v / A for k, v in metrics.items()}
    grad_norm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    new_state = {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state,
                 "step": state["step"] + 1, "rng": state["rng"]}
    metrics.update(loss=loss, grad_norm=grad_norm, lr=schedule(state["step"]))
    return new_state, metrics
  return train_step


def make_eval_step(model, config):
  """params, batch -> {ce_sum, count, family_ce_sum, family_count} with train=False routing."""
  def eval_step(params, batch):
    _, m = forward(model, config, params, batch, train=False)
    return {k: m[k] for k in ("ce_sum", "count", "family_ce_sum", "family_count")}
  return eval_step


def jit_train_step(step_fn, shardings, mesh):
  rep = sharding.replicated(mesh)
  return jax.jit(step_fn, in_shardings=(shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(shardings, rep), donate_argnums=0)


def jit_eval_step(step_fn, shardings, mesh):
  return jax.jit(step_fn, in_shardings=(shardings["params"], sharding.batch_sharding(mesh)),
                 out_shardings=sharding.replicated(mesh))


def family_losses(ce_sum, count) -> dict:
  """{"loss/<Family>": mean CE} for families with tokens in the batch."""
  ce_sum, count = np.asarray(ce_sum), np.asarray(count)
  return {f"loss/{name}": float(ce_sum[i] / count[i])
          for i, name in enumerate(languages.FAMILIES) if count[i] > 0}
