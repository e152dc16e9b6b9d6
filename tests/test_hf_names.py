"""hf/names.py, the one HF name table, against the checkpoints transformers itself writes.

For each architecture a tiny transformers model is saved locally; the table must name exactly the
tensors of that file with exactly their shapes, and cover every leaf of our model (each expert row
once). Export then import through the table gives back the same params bit for bit.
"""

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from apollo_jax.hf import config as hf_config  # noqa: E402
from apollo_jax.hf import export as hf_export  # noqa: E402
from apollo_jax.hf import load as hf_load  # noqa: E402
from apollo_jax.hf import names as hf_names  # noqa: E402
from apollo_jax.hf.safetensors import read_safetensors  # noqa: E402
from apollo_jax.model.transformer import abstract_params  # noqa: E402

BASE = dict(vocab_size=96, hidden_size=16, intermediate_size=24, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2)
MOE = dict(BASE, moe_intermediate_size=24, num_experts=5, num_experts_per_tok=2, decoder_sparse_step=1,
           mlp_only_layers=[0], shared_expert_intermediate_size=0)
ARCHS = {
    "qwen2_tied": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(BASE, tie_word_embeddings=True)),
    "qwen2_untied": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(BASE, tie_word_embeddings=False)),
    "qwen2_moe": (transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM, MOE),
    "qwen2_moe_shared": (transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM,
                         dict(MOE, shared_expert_intermediate_size=24, mlp_only_layers=[0, 1])),
}


@pytest.fixture(scope="module", params=sorted(ARCHS))
def saved(request, tmp_path_factory):
  """(our config, {HF name: shape} of the safetensors file transformers saved)."""
  config_cls, model_cls, kw = ARCHS[request.param]
  d = str(tmp_path_factory.mktemp(request.param))
  model_cls(config_cls(**kw)).save_pretrained(d)
  config = hf_config.config_from_hf(hf_config.read_hf_config(d))
  state = read_safetensors(f"{d}/model.safetensors")
  return config, {k: tuple(v.shape) for k, v in state.items()}


def _split(config):
  """(top, per-layer trees) of the model's leaf shapes."""
  shapes = jax.tree.map(lambda a: np.zeros(a.shape, np.int8), abstract_params(config))
  return hf_load.split_layers(shapes, config)


def _leaf(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def test_table_names_every_saved_tensor(saved):
  config, hf_shapes = saved
  table = {n.hf: n for n in hf_names.names(config)}
  placeholders = {}
  if not config.moe.shared_expert:
    for i in hf_export.moe_layers(config):
      placeholders.update(hf_names.empty_shared_expert(i, config.model.hidden_size))
  assert len(table) == len(hf_names.names(config))                  # no name twice
  assert set(table) | set(placeholders) == set(hf_shapes)
  for k, shape in placeholders.items():
    assert hf_shapes[k] == shape, k
  top, layers = _split(config)
  for k, n in table.items():
    leaf = _leaf(top if n.layer is None else layers[n.layer], n.path)
    shape = leaf.shape if n.expert is None else leaf.shape[1:]
    assert (shape[::-1] if n.transpose else shape) == hf_shapes[k], k


def test_table_covers_every_leaf(saved):
  config, _ = saved
  top, layers = _split(config)
  want = {(None, p) for p in _paths(top)} | {(i, p) for i, layer in enumerate(layers) for p in _paths(layer)}
  rows = {}
  for n in hf_names.names(config):
    rows.setdefault((n.layer, n.path), []).append(n.expert)
  assert set(rows) == want
  for key, experts in rows.items():
    assert experts == ([None] if "experts" not in key[1] else list(range(config.moe.num_experts))), key


def _paths(tree, prefix=()):
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from _paths(v, prefix + (k,))
    else:
      yield prefix + (k,)


def test_export_then_import_is_exact(saved):
  config, _ = saved
  rng = np.random.RandomState(0)
  params = jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(np.float32), abstract_params(config))
  back = hf_load.params_from_hf(hf_export.state_dict(params, config), config)
  jax.tree.map(np.testing.assert_array_equal, back, params)
