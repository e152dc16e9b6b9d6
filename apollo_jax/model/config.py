"""The model's own config: frozen, hashable, everything the modules need already resolved.

`from_config(config, mesh)` builds it once from a run's ConfigDict (train, inference, plan and
export all go through `transformer.build_model`, which calls it). The model's modules receive only
a `ModelConfig`: they never read the ConfigDict, the data settings, the mesh settings or any
global state. What the run's settings decide is resolved here, in one place:

  head_dim         model.head_dim, or hidden_size // num_heads when 0
  attention        the kernel of model.attention for data.packing on this backend
  attention_interpret  whether that kernel is a Pallas kernel off its native backend (then it
                   runs in interpret mode); from_config(config, backend="tpu") on a CPU machine
                   gives the real TPU kernel, to lower for TPU
  attention_remat  whether blocked recomputes its tiles in the backward (off CPU)
  scan_unroll      whether each nn.scan over dense layers is fully unrolled (on CPU): the same
                   stacked 'layers' params (checkpoints move between backends), no while loop
  moe.layers       the MoE decoder-layer indices parsed from moe.layers
  moe.padded_experts  num_experts rounded up to the expert padding (moe.expert_multiple, or the
                   mesh's expert axis): the parameter shapes, so fixed when the model is built
  moe.family_of_language  the expert of each of the 50 languages under moe.expert_map
  moe.kernel       the dropless grouped-matmul kernel of moe.kernel on this backend
  moe.interpret    the gmm kernel runs in Pallas interpret mode: the backend is not tpu
  moe.dispatch     the dropless dispatch of moe.dispatch on this backend and the mesh's expert
                   axis (model/expert_parallel.py: gather_weights without an expert axis)
  mesh, batch_axes, head_axis  the abstract mesh, its batch axes and the kv-head axis that the
                   dropless MoE and the Pallas attention kernels shard_map over (mesh None: one
                   device, or plain GSPMD)
"""

import dataclasses

import jax

from apollo_jax import config as cfg
from apollo_jax import languages
from apollo_jax.model import attention, dropless, expert_parallel
from apollo_jax.runtime import sharding


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  layers: tuple = ()                 # MoE decoder-layer indices
  num_experts: int = 0               # real experts (routed to)
  padded_experts: int = 0            # real + zero experts (never routed to): the expert dim E
  top_k: int = 2
  routing: str = "hybrid"            # hybrid | topk | language
  family_of_language: tuple = ()     # expert index of each language index 0..49
  norm_topk_prob: bool = False
  shared_expert: bool = False
  router_init_std: float = 0.02
  impl: str = "dropless"             # dropless | capacity
  kernel: str = "blocks"             # dropless grouped matmul: blocks | ragged | gmm
  interpret: bool = False            # gmm only: Pallas interpret mode (resolved for a non-TPU backend)
  dispatch: str = "gather_weights"   # dropless over the expert axis: gather_weights | gather_tokens | ragged_a2a
  capacity_factor: float = 1.0       # capacity impl only, train / eval
  eval_capacity_factor: float = 2.0
  min_capacity: int = 4
  group_size: int = 1024
  analysis: bool = False             # also sow each token's chosen experts


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float
  rms_norm_eps: float
  tie_embeddings: bool
  init_std: float
  dtype: str                         # compute dtype; params are float32
  remat: str                         # none | full | dots
  scan_layers: bool
  attention: str                     # resolved kernel: xla | blocked | cudnn | splash | pallas_gpu
  attention_interpret: bool          # Pallas interpret mode (the kernel is not native on the backend)
  attention_remat: bool              # blocked: recompute each tile in the backward
  moe: MoEConfig
  scan_unroll: bool = False          # unroll the scanned dense layers (params stay stacked)
  mesh: jax.sharding.AbstractMesh | None = None
  batch_axes: tuple = ()             # the mesh axes the batch rows are sharded over
  head_axis: str | None = None       # the mesh axis the (kv) heads are sharded over


def from_config(config, mesh=None, backend: str | None = None) -> ModelConfig:
  """The ModelConfig of a run's ConfigDict, validated first (config.validate); `mesh` (a jax Mesh or AbstractMesh) is the one the
  model will run under, `backend` defaults to jax's (both only choose kernels and the dispatch)."""
  cfg.validate(config)
  m, e = config.model, config.moe
  backend = backend or jax.default_backend()
  abstract = getattr(mesh, "abstract_mesh", mesh)
  mesh = None if abstract is None or abstract.empty or abstract.size == 1 else abstract
  expert_axis = dict(mesh.shape).get(sharding.EXPERT_AXIS, 1) if mesh is not None else 1
  moe = MoEConfig(
      layers=tuple(cfg.moe_layer_indices(e.layers, m.num_layers)), num_experts=e.num_experts,
      padded_experts=cfg.padded_num_experts(config), top_k=e.top_k, routing=e.routing,
      family_of_language=tuple(int(x) for x in languages.expert_map(e.expert_map)),
      norm_topk_prob=e.norm_topk_prob, shared_expert=e.shared_expert, router_init_std=e.router_init_std,
      impl=e.impl, kernel=dropless.resolve_kernel(e.kernel, backend), interpret=backend != "tpu",
      dispatch=expert_parallel.resolve_dispatch(e.get("dispatch", "auto"), backend, expert_axis,
                                                cfg.padded_num_experts(config)),
      capacity_factor=e.capacity_factor,
      eval_capacity_factor=e.eval_capacity_factor, min_capacity=e.min_capacity,
      group_size=e.group_size, analysis=e.analysis)
  kernel = attention.resolve(m.attention, backend)
  return ModelConfig(
      vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
      num_layers=m.num_layers, num_heads=m.num_heads, num_kv_heads=m.num_kv_heads,
      head_dim=m.head_dim if m.head_dim > 0 else m.hidden_size // m.num_heads,
      rope_theta=m.rope_theta, rms_norm_eps=m.rms_norm_eps, tie_embeddings=m.tie_embeddings,
      init_std=m.init_std, dtype=m.dtype, remat=m.remat, scan_layers=m.scan_layers,
      attention=kernel, attention_interpret=attention.interprets(kernel, backend),
      attention_remat=attention.remats(kernel, backend), moe=moe, scan_unroll=scan_unrolls(backend),
      mesh=mesh,
      batch_axes=tuple(sharding.BATCH_AXES), head_axis=dict(sharding.RULES)["act_kv"])


def scan_unrolls(backend: str) -> bool:
  """Whether the scanned dense layers are unrolled: on CPU. There the while loop copies every
  layer's residuals into (and its weights and gradients out of) stacked buffers: unrolled, a
  train step of benchmarks/vs_torch.py's shape takes ~10% less CPU time; off CPU the loop keeps
  compiles fast."""
  return backend == "cpu"
