"""Apollo-MoE decoder: Qwen2 with Post-MoE layers (embedding, decoder blocks, final norm, LM head).

Layer blocks (`layer_plan`): with model.scan_layers each maximal run of consecutive dense layers
is one nn.scan block `layers_{start}` (params stacked on a leading 'layers' axis: fast compiles
at 28 layers); every MoE layer is its own unrolled block `layers_{i}`, so its routing stats are
sown per layer into the "moe" collection and the param tree maps 1:1 to HF names.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from apollo_jax.model import layers
from apollo_jax.model import config as model_config
from apollo_jax.model.config import ModelConfig
from apollo_jax.model.moe import MoEBlock

ACT = ("act_batch", "act_length", "act_embed")


def layer_plan(mc: ModelConfig):
  """Layer blocks in order: dicts {"name", "kind": "dense"|"moe", "start", "count", "stacked"}."""
  n = mc.num_layers
  moe = set(mc.moe.layers)
  plan, i = [], 0
  while i < n:
    if i in moe or not mc.scan_layers:
      kind = "moe" if i in moe else "dense"
      plan.append(dict(name=f"layers_{i}", kind=kind, start=i, count=1, stacked=False))
      i += 1
      continue
    j = i
    while j < n and j not in moe:
      j += 1
    plan.append(dict(name=f"layers_{i}", kind="dense", start=i, count=j - i, stacked=True))
    i = j
  return plan


class DecoderLayer(nn.Module):
  """Pre-norm residual block: x + Attn(norm(x)), then x + MLP-or-MoE(norm(x))."""
  config: ModelConfig
  moe: bool = False
  train: bool = False
  scanned: bool = False     # nn.scan body: return (carry, None)
  cache_len: int = 0        # > 0: generation with a KV cache of this many slots (kv_cache.py)

  @nn.compact
  def __call__(self, x, segment_ids, positions, family=None):
    m = self.config
    dtype = layers.dtype_of(m.dtype)
    h = layers.RMSNorm(m.rms_norm_eps, name="input_layernorm")(x)
    x = x + layers.Attention(m.num_heads, m.num_kv_heads, m.head_dim, m.rope_theta, m.init_std,
                             dtype, m.attention, m.attention_interpret, m.attention_remat,
                             m.mesh, m.batch_axes, m.head_axis, name="self_attn")(h, segment_ids, positions, self.cache_len)
    h = layers.RMSNorm(m.rms_norm_eps, name="post_attention_layernorm")(x)
    if self.moe:
      y, stats = MoEBlock(self.config, name="mlp")(h, segment_ids, family, self.train)
      if not self.is_initializing():      # init returns params only
        for key, value in stats.items():  # sown here: state["moe"]["layers_i"][key]
          self.sow("moe", key, value)
    else:
      y = layers.MLP(m.intermediate_size, m.init_std, dtype, name="mlp")(h)
    x = nn.with_logical_constraint(x + y, ACT)
    return (x, None) if self.scanned else x


def _remat(cls, policy: str, scanned: bool):
  if policy == "none":
    return cls
  # full: keep only the layer inputs; dots: also keep projection matmul outputs (no batch dims,
  # i.e. not the attention scores), trading memory for less recompute.
  pol = None if policy == "full" else jax.checkpoint_policies.dots_with_no_batch_dims_saveable
  return nn.remat(cls, policy=pol, prevent_cse=not scanned)


def head_logits(x_BSM, w_MV):
  """fp32 logits of either head: the matmul in x's dtype with fp32 accumulation and output."""
  return jnp.einsum("BSM,MV->BSV", x_BSM, w_MV.astype(x_BSM.dtype), preferred_element_type=jnp.float32)


class LMHead(nn.Module):
  """The untied head's kernel [M, V] (param lm_head/kernel = HF lm_head.weight transposed)."""
  shape: tuple
  std: float

  @nn.compact
  def __call__(self):
    return self.param("kernel", layers.kernel_init(self.std, ("embed", "vocab")), self.shape, jnp.float32)


class Transformer(nn.Module):
  """Logits [B, S, V] fp32; with return_hidden, (final-norm hidden states [B, S, M], head [M, V])."""
  config: ModelConfig

  @nn.compact
  def __call__(self, input_ids, language_ids=None, segment_ids=None, positions=None,
               train: bool = False, return_hidden: bool = False, cache_len: int = 0):
    """cache_len > 0: generation; apply with mutable=["cache"] (kv_cache.py)."""
    m = self.config
    dtype = layers.dtype_of(m.dtype)
    B, S = input_ids.shape
    plan = layer_plan(self.config)
    if segment_ids is None:
      segment_ids = jnp.ones((B, S), jnp.int32)
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
    family = self._family(language_ids, train, any(p["kind"] == "moe" for p in plan))

    embed = nn.Embed(m.vocab_size, m.hidden_size, param_dtype=jnp.float32, dtype=dtype,
                     embedding_init=layers.kernel_init(m.init_std, ("vocab", "embed")),
                     name="embed_tokens")
    # All-gather the table's FSDP-sharded embedding dim before the lookup (as for every FSDP
    # weight): otherwise the lookup's gradient needs a batch->embed reshard XLA can only do by
    # replicating the activations. Pinning the table's own sharding first makes the gather move
    # the table in the dtype it arrives in (bf16 from training/step.py's compute_params), not fp32.
    table = nn.with_logical_constraint(embed.embedding, ("vocab", "embed"))
    table = nn.with_logical_constraint(table, ("vocab", "act_embed"))
    x = nn.with_logical_constraint(jnp.take(table, input_ids, axis=0).astype(dtype), ACT)

    for p in plan:
      if p["stacked"]:
        body = nn.scan(_remat(DecoderLayer, m.remat, True), variable_axes={"params": 0, "cache": 0},
                       split_rngs={"params": True}, in_axes=(nn.broadcast, nn.broadcast),
                       length=p["count"], unroll=p["count"] if m.scan_unroll else 1,
                       metadata_params={nn.PARTITION_NAME: "layers"})
        x, _ = body(self.config, scanned=True, cache_len=cache_len, name=p["name"])(x, segment_ids, positions)
      else:
        moe = p["kind"] == "moe"
        layer = _remat(DecoderLayer, m.remat, False)(self.config, moe=moe, train=train,
                                                     cache_len=cache_len, name=p["name"])
        x = layer(x, segment_ids, positions, family if moe else None)

    x = layers.RMSNorm(m.rms_norm_eps, name="norm")(x)
    if m.tie_embeddings:
      w_MV = embed.embedding.T
    else:
      w_MV = LMHead((m.hidden_size, m.vocab_size), m.init_std, name="lm_head")()
    if return_hidden:       # the loss computes the logits a chunk at a time (apollo_jax.loss)
      return x, w_MV
    return nn.with_logical_constraint(head_logits(x, w_MV), ("act_batch", "act_length", "act_vocab"))

  def _family(self, language_ids, train, has_moe):
    """Per-token expert ids from language indices (constant table), with clear errors."""
    e = self.config.moe
    if language_ids is None:
      if has_moe and not self.is_initializing():
        if e.routing == "language":
          raise ValueError("moe.routing='language' routes every token by its language, so "
                           "language_ids [B, S] (language indices 0..49) are required, also at "
                           "inference; pass language_ids=... to apply().")
        if e.routing == "hybrid" and train:
          raise ValueError("moe.routing='hybrid' with train=True forces each token's language-family "
                           "expert, so language_ids [B, S] are required; pass language_ids=... "
                           "(inference with train=False needs none).")
      return None
    return jnp.asarray(e.family_of_language, jnp.int32)[language_ids]


def build_model(config, mesh=None, backend: str | None = None) -> nn.Module:
  """The flax module of a run's ConfigDict, to run under `mesh` on `backend` (default: jax's;
  model/config.py resolves what the settings decide; `Transformer(model_config)` builds one from
  a ModelConfig alone)."""
  return Transformer(model_config.from_config(config, mesh, backend))


def abstract_variables(model, batch_shape=(1, 8)) -> dict:
  """Boxed jax.ShapeDtypeStruct tree of `model.init`'s variables (shapes and logical axes, nothing
  allocated). The shapes do not depend on `batch_shape`; a mesh-sharded model needs a batch its
  batch axes divide."""
  ids = jnp.zeros(batch_shape, jnp.int32)
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ids))


def abstract_params(config) -> dict:
  """Unboxed jax.ShapeDtypeStruct tree of the params of build_model(config) (the shapes do not
  depend on the mesh it runs under)."""
  return unbox(abstract_variables(build_model(config))["params"])


def unbox(tree):
  """Strip the logical-partitioning boxes WITHOUT applying sharding constraints (so it also works
  on abstract values and outside jit under an active mesh, where nn.meta.unbox would fail)."""
  return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.meta.AxisMetadata)
                      else x, tree, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def _layer_index(name: str) -> int:
  return int(name.rsplit("_", 1)[1])


def moe_aux_loss(moe_state, config):
  """sum over MoE layers (and sown calls) of aux_loss_weight*aux_loss + z_loss_weight*z_loss."""
  e = config.moe
  total = jnp.float32(0.0)
  for stats in (moe_state or {}).values():
    if e.aux_loss_weight:
      total = total + e.aux_loss_weight * sum(stats["aux_loss"])
    if e.z_loss_weight:
      total = total + e.z_loss_weight * sum(stats["z_loss"])
  return total


METRIC_KEYS = ("load", "drop_fraction", "entropy", "aux_loss", "z_loss")


def moe_metrics(moe_state):
  """Flat dict {"moe/layer_{i}/{load|drop_fraction|entropy|aux_loss|z_loss}": array} (mean over
  the sown calls of a layer)."""
  out = {}
  for name in sorted(moe_state or {}, key=_layer_index):
    for key in METRIC_KEYS:
      values = moe_state[name].get(key)
      if values:
        out[f"moe/layer_{_layer_index(name)}/{key}"] = sum(values) / len(values)
  return out
