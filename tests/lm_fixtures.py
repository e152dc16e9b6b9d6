"""Shared builders for the inference / generation / export tests (cached per pytest process).

* `workdir`: a training workdir (config.json, tokenizer copy, Orbax checkpoints at steps 2 and 4)
  of the randomized "hybrid8" model, written by the code train.py uses (tests/test_train.py checks
  that a real run writes config.json);
* `randomized(variant)`: tiny models whose every weight is random and large (norm scales 1 +
  0.1 z, other weights 0.2 z), so logits are far from uniform and a 1e-4 bound means something:
  variants "hybrid8" (last:2, 7 experts padded to 8), "dense" (untied head), "last3", "all";
* `export(lm, dir)`: the fp32 HF export of an LM.
"""

import os

import jax
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE_TOKENIZER = os.path.join(REPO, "data/sample/tokenizer.model")
VARIANTS = {
    "hybrid8": dict(moe_layers="last:2", expert_multiple=8, tie=True),
    "dense": dict(moe_layers="none", expert_multiple=0, tie=False),
    "last3": dict(moe_layers="last:3", expert_multiple=0, tie=True),
    "all": dict(moe_layers="all", expert_multiple=0, tie=True),
}
_CACHE = {}


class _NoData:
  def get_state(self):
    return {}


def workdir(root):
  """A training workdir written by train.py's own pieces (config.json + tokenizer copy by
  workdir.write_config, Orbax checkpoints by checkpoint.Checkpointer): the randomized "hybrid8"
  model (Post-MoE, Hybrid-2, 7 experts padded to 8) at steps 2 and 4 (different weights)."""
  if "workdir" not in _CACHE:
    import jax.numpy as jnp
    from apollo_jax.training import checkpoint
    from apollo_jax.training import optimizer
    from apollo_jax.runtime import workdir as workdir_io
    path = os.path.join(root, "workdir")
    config = tiny_config(**VARIANTS["hybrid8"])
    config.steps, config.global_batch = 4, 16
    workdir_io.write_config(config, path)
    tx = optimizer.make_optimizer(config)
    ckpt = checkpoint.Checkpointer(path, config)
    for step in (2, 4):
      params = jax.tree.map(jnp.asarray, randomized_params(config, seed=step))
      state = {"params": params, "opt_state": tx.init(params), "step": jnp.int32(step),
               "rng": jax.random.PRNGKey(0)}
      ckpt.save(step, state, _NoData())
    ckpt.close()
    _CACHE["workdir"] = path
  return _CACHE["workdir"]


def tiny_config(moe_layers="last:2", expert_multiple=8, tie=True):
  from configs import tiny
  c = tiny.get_config(f"moe_layers={moe_layers.replace(',', ';')}")
  c.moe.expert_multiple = expert_multiple
  c.model.tie_embeddings = tie
  c.data.tokenizer = SAMPLE_TOKENIZER
  return c


def randomized_params(config, seed=0):
  from apollo_jax import config as cfg
  from apollo_jax.hf import load as hf_load
  from apollo_jax.model.transformer import abstract_params
  rng = np.random.RandomState(seed)
  flat = jax.tree_util.tree_flatten_with_path(abstract_params(config))
  leaves = []
  for path, leaf in flat[0]:
    name = jax.tree_util.keystr(path)
    z = rng.standard_normal(leaf.shape).astype(np.float32)
    leaves.append(1 + 0.1 * z if "norm" in name else 0.2 * z)
  params = jax.tree.unflatten(flat[1], leaves)
  # padded experts must be zero (never routed to); repad_experts checks that, so zero them here
  n = config.moe.num_experts
  if cfg.padded_num_experts(config) > n:
    top, layers = hf_load.split_layers(params, config)
    for layer in layers:
      for w in layer["mlp"].get("experts", {}).values():
        w[n:] = 0
    params = hf_load.join_layers(top, layers, config)
  return params


def randomized(variant, devices=None):
  """(config, LM) of a randomized tiny model with the sample tokenizer."""
  key = ("lm", variant)
  if key not in _CACHE:
    from apollo_jax import inference
    from apollo_jax.data.tokenizer import load_tokenizer
    config = tiny_config(**VARIANTS[variant])
    params = randomized_params(config, seed=len(variant))
    lm = inference.from_params(config, params, load_tokenizer(SAMPLE_TOKENIZER),
                               devices=devices or jax.devices()[:1])
    _CACHE[key] = lm
  return _CACHE[key]


def export(lm, out_dir, dtype="float32"):
  key = ("export", id(lm), dtype)
  if key not in _CACHE:
    from apollo_jax.hf import export as hf_export
    hf_export.export(lm, out_dir, dtype)
    _CACHE[key] = out_dir
  return _CACHE[key]


def hf_model(path):
  """(model, loading info) of stock transformers, fp32, eval mode."""
  import torch
  import transformers
  torch.set_num_threads(1)
  model, info = transformers.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True,
                                                                  dtype=torch.float32)
  return model.eval(), info


def torch_logits(model, ids):
  import torch
  with torch.no_grad():
    return model(torch.tensor(np.asarray(ids), dtype=torch.long)).logits.numpy()


def random_hf_moe(path, seed=2, **overrides):
  """A stock transformers Qwen2-MoE (7 experts in the last 2 of 4 layers, sample-tokenizer
  vocabulary) with every weight randomised, saved to `path`; returns the torch model."""
  import torch
  import transformers
  c = transformers.Qwen2MoeConfig(**{
      **dict(vocab_size=4096, hidden_size=32, intermediate_size=48, moe_intermediate_size=48,
             num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, num_experts=7,
             num_experts_per_tok=2, norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[0, 1],
             shared_expert_intermediate_size=0, tie_word_embeddings=False), **overrides})
  model = transformers.Qwen2MoeForCausalLM(c)
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      z = torch.randn(p.shape, generator=g)
      p.copy_(1 + 0.1 * z if "norm" in name else 0.2 * z)
  model.eval().save_pretrained(path)
  return model
