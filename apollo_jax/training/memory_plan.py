"""Memory and FLOP plan of the real train step, compiled ahead of time (the library of
apollo_jax/plan.py, whose docstring describes what is measured and how)."""

import dataclasses

import jax
import jax.numpy as jnp

from apollo_jax import config as cfg
from apollo_jax.model import config as model_config
from apollo_jax.training import metrics as mx
from apollo_jax.training import loss
from apollo_jax.training import optimizer
from apollo_jax.runtime import sharding
from apollo_jax.training import step as ts
from apollo_jax.model import transformer

GB = 1e9
DEFAULT_BUDGET_GB = 80.0
# A target's kernel that XLA cannot compile on another backend -> the closest one it can: the same
# math with O(TILE x S) attention memory per head (blocked, tiles recomputed in the backward as
# off CPU) and the grouped matmul over the same sorted rows (blocks; ragged_dot off its native
# TPU would expand to a dense dot over every expert).
# The ragged_all_to_all dispatch (not implemented on XLA:CPU) becomes the ring of experts: the same
# weights and gradients per device, the same static worst-case receive rows.
STAND_IN = {"splash": "blocked", "pallas_gpu": "blocked", "cudnn": "blocked", "ragged": "blocks",
            "gmm": "blocks", "ragged_a2a": "gather_tokens"}
TARGETS = ("cpu", "gpu", "tpu")


@dataclasses.dataclass
class Plan:
  devices: int
  mesh: dict
  arguments: int          # bytes per device
  outputs: int
  aliased: int
  temporaries: int
  budget: float
  hlo_flops: float | None  # whole step, all devices
  ideal_flops: float
  kernels: str = ""        # the target's kernels and what was compiled for them here

  @property
  def total(self) -> int:
    return self.arguments + self.outputs - self.aliased + self.temporaries

  @property
  def fits(self) -> bool:
    return self.total <= self.budget


def abstract_batch(config, mesh) -> dict:
  shape = (config.global_batch, config.data.seq_len)
  return {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding.batch_sharding(mesh))
          for k in ts.BATCH_KEYS}


def abstract_inputs(config, mesh, model, tx):
  """(state, batch) as ShapeDtypeStructs carrying their shardings, and the state shardings."""
  abstract, shardings, _ = ts.state_shardings(model, config, tx, mesh)
  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  return state, abstract_batch(config, mesh), shardings


def target_model(config, mesh, target: str | None = None):
  """(ModelConfig with `target`'s kernels as this machine compiles them, what they are in words).
  Off the target, a kernel XLA cannot compile here is replaced by its STAND_IN."""
  here = jax.default_backend()
  mc = model_config.from_config(config, mesh, target or here)
  if (target or here) == here:
    return mc, f"attention {mc.attention}, MoE {mc.moe.kernel}, dispatch {mc.moe.dispatch}"
  sub = lambda k: STAND_IN.get(k, k)
  swapped = sub(mc.attention) != mc.attention
  compiled = dataclasses.replace(mc, attention=sub(mc.attention), attention_interpret=False,
                                 attention_remat=mc.attention_remat or swapped,
                                 moe=dataclasses.replace(mc.moe, kernel=sub(mc.moe.kernel), interpret=False,
                                                         dispatch=sub(mc.moe.dispatch)))
  say = lambda a, b: a if a == b else f"{a} (compiled here as {b})"
  return compiled, (f"{target}: attention {say(mc.attention, compiled.attention)}, "
                    f"MoE {say(mc.moe.kernel, compiled.moe.kernel)}, "
                    f"dispatch {say(mc.moe.dispatch, compiled.moe.dispatch)}")


def lower_train_step(config, mesh, model=None, platform: str | None = None):
  """The jitted train step of `train` and its lowering for abstract inputs, for the ModelConfig
  `model` (default: the config's on this machine), lowered for `platform` (default: this
  machine's; e.g. "tpu" or "cuda" from a CPU machine, which lowers but cannot compile)."""
  with sharding.activate(mesh):
    model = transformer.Transformer(model or model_config.from_config(config, mesh))
    tx = optimizer.make_optimizer(config)
    state, batch, shardings = abstract_inputs(config, mesh, model, tx)
    fn = ts.jit_train_step(ts.make_train_step(model, config, tx, mesh), shardings, mesh)
    traced = fn.trace(state, batch)
    return fn, traced.lower(lowering_platforms=(platform,)) if platform else traced.lower()


def hlo_flops(config, mesh, target: str | None = None) -> float:
  """XLA's FLOPs of one whole train step (all devices), counted on the loop-free step: layers
  unrolled, one micro-batch (x grad_accum), the loss on whole rows plus the chunked loss's one
  extra head matmul per token (its backward recomputes the logits), and the dropless MoE's
  grouped matmul as one batched einsum over its blocks (dropless kernel "einsum": the same rows
  as `blocks`, at the static worst-case padding, without its loop) and no shard_map."""
  flat = config.copy_and_resolve_references()
  flat.model.scan_layers = False
  flat.global_batch, flat.grad_accum, flat.loss_chunk = config.global_batch // config.grad_accum, 1, 0
  mc, _ = target_model(flat, mesh, target)
  # mesh None: no shard_map, whose body a lowered program's cost analysis counts once, not once
  # per device; the MoE then sorts the micro-batch in one plan (padding of one sort, not one per device)
  mc = dataclasses.replace(mc, mesh=None, moe=dataclasses.replace(mc.moe, kernel="einsum"))
  _, lowered = lower_train_step(flat, mesh, mc)
  S, m = config.data.seq_len, config.model
  recompute = 0
  if loss.chunk_length(S, config.loss_chunk) < S:
    recompute = 2 * m.hidden_size * m.vocab_size * config.global_batch * S
  return float(lowered.cost_analysis()["flops"]) * config.grad_accum + recompute


def budget_bytes(config, devices) -> float:
  gb = float(config.get("device_memory_gb", 0.0) or 0.0)
  if gb > 0:
    return gb * GB
  stats = devices[0].memory_stats() if devices[0].platform != "cpu" else None
  return float(stats["bytes_limit"]) if stats and "bytes_limit" in stats else DEFAULT_BUDGET_GB * GB


def make_plan(config, mesh, compiled, flops: bool = True, target: str | None = None) -> Plan:
  mem = compiled.memory_analysis()
  devices = list(mesh.devices.flat)
  return Plan(devices=len(devices), mesh=dict(mesh.shape),
              arguments=mem.argument_size_in_bytes, outputs=mem.output_size_in_bytes,
              aliased=mem.alias_size_in_bytes, temporaries=mem.temp_size_in_bytes,
              budget=budget_bytes(config, devices),
              hlo_flops=hlo_flops(config, mesh, target) if flops else None,
              ideal_flops=mx.flops_per_token(config) * config.global_batch * config.data.seq_len,
              kernels=target_model(config, mesh, target)[1])


def format_plan(config, p: Plan) -> str:
  g = lambda b: f"{b / GB:.3g} GB"
  m = config.model
  lines = [
      f"plan: {p.devices} devices, mesh {p.mesh}; {config.global_batch} rows x {config.data.seq_len} "
      f"tokens per step = {config.grad_accum} micro-batches of {config.global_batch // config.grad_accum} "
      f"rows; dtype {m.dtype}, remat {m.remat}, loss_chunk {config.loss_chunk}",
      f"  kernels: {p.kernels}",
      f"  memory per device: arguments {g(p.arguments)} + outputs {g(p.outputs)} - aliased "
      f"{g(p.aliased)} + temporaries {g(p.temporaries)} = {g(p.total)} of {g(p.budget)} "
      f"({'fits' if p.fits else 'DOES NOT FIT'})",
  ]
  if p.hlo_flops is not None:
    lines.append(f"  FLOPs per step: HLO {p.hlo_flops:.4g}, ideal {p.ideal_flops:.4g} "
                 f"(6 x active params + causal attention) -> {p.hlo_flops / p.ideal_flops:.3f} x ideal")
  return "\n".join(lines)


def warning(p: Plan) -> str:
  return (f"WARNING: the train step needs ~{p.total / GB:.1f} GB per device, over the "
          f"{p.budget / GB:.1f} GB budget: lower the micro-batch (raise grad_accum), set "
          "--config.model.remat=full, lower --config.loss_chunk, or shard more (config.mesh).")


def before_training(config, mesh, train_fn, state, log=print):
  """Hook for `train`: compile the step for `state` and the batch shape, print the plan (or a
  warning when it does not fit); returns the compiled step, which the loop then calls.
  config.plan: on | off | auto (= on, except on CPU, where the tiny runs skip the extra lowering
  the FLOP count needs)."""
  mode = config.get("plan", "auto")
  if mode == "off" or (mode == "auto" and jax.devices()[0].platform == "cpu"):
    return train_fn
  with sharding.activate(mesh):
    compiled = train_fn.lower(state, abstract_batch(config, mesh)).compile()
  p = make_plan(config, mesh, compiled)
  log(format_plan(config, p))
  if not p.fits:
    log(warning(p))
  return compiled


def plan(config, devices=None, target: str | None = None) -> Plan:
  """Compile the train step of `config` on `devices` (default: all) with the kernels of `target`
  (cpu | gpu | tpu; default: this machine's, see `target_model`) and return its plan."""
  devices = jax.devices() if devices is None else devices
  cfg.validate(config, len(devices))
  mesh = sharding.make_mesh(config, devices)
  _, lowered = lower_train_step(config, mesh, target_model(config, mesh, target)[0])
  with sharding.activate(mesh):
    compiled = lowered.compile()
  return make_plan(config, mesh, compiled, target=target)
