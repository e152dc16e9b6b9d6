"""Mesh, logical-axis rules and shardings. The model only names logical axes; this file maps them.

Mesh axes ('data', 'fsdp', 'expert', 'tensor'), all AxisType.Auto (flax linen's logical
constraints do not work on Explicit axes). The batch is split over data*fsdp*expert: outside
the MoE layers the expert axis is just more data parallelism, so parameters are FSDP-sharded on
their `embed` dimension over fsdp*expert (expert weights, already split over `expert` by expert,
over fsdp only: `embed_moe`), MLP/attention heads/vocab on `tensor`.
"""

import contextlib
import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from apollo_jax import config as cfg

BATCH_AXES = ("data", "fsdp", "expert")
EXPERT_AXIS = "expert"

# logical axis -> mesh axes. Parameters use the plain names, activations the act_* names.
RULES = (
    ("batch", BATCH_AXES),
    ("embed", ("fsdp", EXPERT_AXIS)),
    ("embed_moe", "fsdp"),
    ("heads", "tensor"),
    ("kv", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("exp", EXPERT_AXIS),
    ("layers", None),
    ("norm", None),
    ("act_batch", BATCH_AXES),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("act_exp", "expert"),            # E of dispatched activations [E, G, C, M]
    ("act_group", ("data", "fsdp")),  # G of dispatched activations (expert moved to E)
)


def make_mesh(config, devices=None) -> Mesh:
  """Mesh of config.mesh over `devices` (default: all), with the one -1 axis filled."""
  devices = jax.devices() if devices is None else list(devices)
  sizes = cfg.mesh_shape(config, len(devices))
  shape = tuple(sizes[a] for a in cfg.MESH_AXES)
  try:
    from jax.experimental import mesh_utils
    grid = mesh_utils.create_device_mesh(shape, devices=devices)
  except Exception:  # odd device topologies (e.g. CPU subsets): plain row-major order
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, cfg.MESH_AXES, axis_types=(AxisType.Auto,) * len(shape))


def logical_to_sharding(logical_tree, mesh: Mesh):
  """PartitionSpecs of logical names (e.g. from nn.get_partition_spec) -> NamedShardings."""
  return nn.logical_to_mesh_sharding(logical_tree, mesh, RULES)


def param_shardings(abstract_variables, mesh: Mesh):
  """NamedShardings for the (boxed) abstract variables of `module.init` under `mesh`."""
  return logical_to_sharding(nn.get_partition_spec(abstract_variables), mesh)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """[B, S] arrays: rows split over data*fsdp*expert, sequence replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_divisible(abstract_params, shardings):
  """A clear error when a parameter dimension does not divide over its mesh axes."""
  def check(path, x, s):
    for dim, axes in zip(x.shape, tuple(s.spec) + (None,) * (x.ndim - len(s.spec))):
      if axes is None:
        continue
      n = int(np.prod([s.mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes)]))
      if dim % n:
        raise ValueError(f"parameter {jax.tree_util.keystr(path)} {x.shape}: dimension {dim} is not "
                         f"divisible by mesh axes {axes} of size {n}; change config.mesh")
  jax.tree_util.tree_map_with_path(check, abstract_params, shardings)


def per_device(fn, mesh, batch_axes, in_specs, out_specs, fallback=None):
  """`fn` shard_map'ed over `mesh` (an AbstractMesh), its first argument's rows split over
  `batch_axes`; plain `fallback` (default `fn`) with no mesh, or when those rows do not split
  over the batch axes (e.g. the 1-row init: GSPMD keeps it exact, just not device-local)."""
  def call(*args):
    if mesh is None or args[0].shape[0] % math.prod(mesh.shape[a] for a in batch_axes):
      return (fallback or fn)(*args)
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)(*args)
  return call


@contextlib.contextmanager
def activate(mesh: Mesh):
  """Context for tracing/running the model on `mesh`: the mesh plus the logical-axis rules."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
    yield
