"""Memory and FLOP plan of the real train step, compiled ahead of time for N devices.

`python -m apollo_jax.plan --config=configs/apollo_moe_7b.py --devices=8 [--mesh=fsdp=8] [--target=tpu]`
(exit status 2 when the step does not fit the budget)

--target=cpu|gpu|tpu plans with the kernels `auto` picks on that backend (default: this machine's
if it is an accelerator, else gpu). A kernel XLA cannot compile here (splash, pallas_gpu, cudnn;
ragged_dot, which XLA:CPU expands into a dense dot over every expert; gmm) is compiled as its
closest stand-in (training/memory_plan.py STAND_IN: blocked attention with its tiles recomputed
in the backward, the blocks grouped matmul); the plan prints which kernels it assumed.

Lowers and compiles train_step (the same make_train_step/jit_train_step/state_shardings as
`train`) for abstract, sharded inputs (nothing is allocated). With --devices=N the devices are
N simulated CPU devices; without it, the machine's own. Prints per device:

  memory   from XLA's memory analysis of the compiled SPMD program (which is per device):
           arguments (params + Adam state + batch), outputs, minus outputs aliased to donated
           arguments, plus temporaries (activations, gradients, collectives' buffers); total
           against a budget (default 80 GB: an H100). Simulated devices run XLA:CPU, whose
           fusion and buffer assignment differ from XLA:GPU/TPU: an estimate, not a promise.
  FLOPs    XLA's cost analysis against the ideal (metrics.flops_per_token x tokens: 6 x active
           params + causal attention). XLA counts a while loop's body ONCE, and the train step
           has three (scanned layers, grad-accumulation micro-batches, loss chunks); so the
           FLOPs come from lowering the same step with layers unrolled, one micro-batch and an
           unchunked loss (same math), times grad_accum, plus the chunked loss's logit
           recompute (2 x hidden x vocab per token); the dropless MoE's grouped matmul (itself a
           loop over row blocks) is lowered as one batched einsum over the same blocks (kernel
           "einsum" of model/dropless.py), so the expert matmuls are counted at the static
           worst-case block padding. Lowered (whole-program) and compiled (per device x
           devices) counts agree to ~1 % (tests/test_plan.py). They include remat
           recomputation, blocked attention's masked diagonal tiles, MoE block or capacity
           padding and dispatch einsums.

`train` calls `before_training` (config.plan): it prints the plan before step 1, or a warning
when the step does not fit, and reuses the compiled step.
"""

import sys

import jax

from apollo_jax import config as cfg
from apollo_jax.runtime import sharding
from apollo_jax.training import memory_plan


def parse_mesh(text: str) -> dict:
  """'fsdp=4,expert=2' -> {'fsdp': 4, 'expert': 2} (clear errors)."""
  out = {}
  for item in filter(None, text.split(",")):
    key, _, val = item.partition("=")
    if key not in cfg.MESH_AXES or not val.lstrip("-").isdigit():
      raise ValueError(f"--mesh={text!r}: expected axis=size pairs over {cfg.MESH_AXES}, e.g. fsdp=4,expert=2")
    out[key] = int(val)
  return out


def main(argv):
  from absl import flags
  del argv
  f = flags.FLAGS
  if f.devices:   # simulated CPU devices: must be set before the backend starts
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", f.devices)
  config = f.config
  if f.mesh:
    config.mesh.update(parse_mesh(f.mesh))
  if f.budget_gb:
    config.device_memory_gb = f.budget_gb
  here = jax.default_backend()
  target = f.target or (here if here != "cpu" else "gpu")
  p = memory_plan.plan(config, target=target)
  print(memory_plan.format_plan(config, p))
  if config.model.remat != "none":   # the FLOPs without remat's recomputation (lowering only)
    flat = config.copy_and_resolve_references()
    flat.model.remat = "none"
    flops = memory_plan.hlo_flops(flat, sharding.make_mesh(flat), target)
    print(f"  FLOPs per step without remat: HLO {flops:.4g} -> {flops / p.ideal_flops:.3f} x ideal")
  if not p.fits:
    print(memory_plan.warning(p))
    sys.exit(2)


if __name__ == "__main__":   # flags defined only here, so importing this module never clashes
  from absl import flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "config file, e.g. configs/apollo_moe_7b.py[:args]",
                                  lock_config=True)
  flags.DEFINE_integer("devices", 0, "plan for N simulated CPU devices (0: this machine's devices)")
  flags.DEFINE_enum("target", None, memory_plan.TARGETS, "the backend whose kernels to plan with "
                    "(default: this machine's if an accelerator, else gpu)")
  flags.DEFINE_string("mesh", "", "mesh axis sizes over config.mesh, e.g. fsdp=4,expert=2")
  flags.DEFINE_float("budget_gb", 0.0, "memory budget per device in GB (0: config.device_memory_gb, "
                                       "else the device's own, else 80)")
  from apollo_jax.runtime import cli
  cli.run(main, required=("config",))
