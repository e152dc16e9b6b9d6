"""HF import (Qwen2, Qwen2-MoE, released Apollo-MoE layout), upcycling and the converter CLI.

References are tiny `transformers` models built locally with seeded random weights (every
tensor randomised, so biases and norm scales are exercised too); logits must match to the
rounding noise of their layers (tests/tolerance.py).
"""

import copy
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
torch.set_num_threads(1)

from apollo_jax import config as cfg  # noqa: E402
from apollo_jax.hf import config as hf_config  # noqa: E402
from apollo_jax.hf import load as hf_load  # noqa: E402
from apollo_jax.hf.safetensors import read_safetensors  # noqa: E402
from apollo_jax.hf.upcycle import upcycle  # noqa: E402
from apollo_jax.model.transformer import build_model  # noqa: E402
from tolerance import assert_close, network_terms  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IDS = np.random.RandomState(0).randint(0, 128, (2, 11)).astype(np.int32)
DENSE = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
             rope_parameters={"rope_type": "default", "rope_theta": 5000.0})
MOE = dict(vocab_size=128, hidden_size=32, intermediate_size=48, moe_intermediate_size=48,
           num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, num_experts=7,
           num_experts_per_tok=2, norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[0, 1],
           shared_expert_intermediate_size=0, tie_word_embeddings=False)


def _randomize(model, seed):
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      z = torch.randn(p.shape, generator=g)
      p.copy_(1 + 0.1 * z if "norm" in name else 0.2 * z)
  return model.eval()


def _qwen2(tie, seed=1, **kw):
  c = transformers.Qwen2Config(**{**DENSE, **kw}, tie_word_embeddings=tie)
  return _randomize(transformers.Qwen2ForCausalLM(c), seed)


def _torch_logits(model, ids=IDS):
  with torch.no_grad():
    return model(torch.tensor(ids, dtype=torch.long)).logits.numpy()


def _our_logits(module, params, ids=IDS):
  return np.asarray(module.apply({"params": params}, jnp.asarray(ids)))


def _terms(c):
  """f32 roundings feeding one logit of the transformers model with config `c`."""
  return network_terms(c.num_hidden_layers, c.hidden_size,
                       max(c.intermediate_size, getattr(c, "moe_intermediate_size", 0)))


def _assert_logits(module, params, model):
  ref = _torch_logits(model)
  assert np.abs(ref).max() > 1.0          # non-trivial logits, so the bound means something
  # torch vs XLA kernels, both f32: the same contractions in another order
  assert_close(_our_logits(module, params), ref, dtype=np.float32, terms=_terms(model.config))


@pytest.fixture(scope="module")
def moe_model(tmp_path_factory):
  model = _randomize(transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(**MOE)), 2)
  d = str(tmp_path_factory.mktemp("moe"))
  model.save_pretrained(d)
  return model, d


@pytest.fixture(scope="module")
def dense_model(tmp_path_factory):
  model = _qwen2(tie=False, seed=3)
  d = str(tmp_path_factory.mktemp("dense"))
  model.save_pretrained(d)
  return model, d


# ------------------------------------------------------------------------------ config + reading

def test_config_from_hf_fields():
  c = hf_config.config_from_hf({**transformers.Qwen2MoeConfig(**MOE).to_dict(),
                         "architectures": ["Qwen2MoeForCausalLM"]})
  m, e = c.model, c.moe
  assert (m.vocab_size, m.hidden_size, m.intermediate_size, m.num_layers) == (128, 32, 48, 4)
  assert (m.num_heads, m.num_kv_heads, m.head_dim, m.tie_embeddings) == (4, 2, 0, False)
  assert m.rope_theta == 10000.0
  assert (e.layers, e.num_experts, e.top_k, e.norm_topk_prob) == ("last:2", 7, 2, False)
  assert (e.routing, e.shared_expert, e.expert_map) == ("topk", False, "family7")
  # decoder_sparse_step: every 2nd layer (1, 3) minus mlp_only_layers
  c = hf_config.config_from_hf({**MOE, "model_type": "qwen2_moe", "mlp_only_layers": [], "decoder_sparse_step": 2,
                         "num_experts": 12, "shared_expert_intermediate_size": 48, "rope_theta": 1e6})
  assert (c.moe.layers, c.moe.shared_expert, c.moe.expert_map, c.model.rope_theta) == ("1,3", True, "major12", 1e6)
  dense = hf_config.config_from_hf({**DENSE, "architectures": ["Qwen2ForCausalLM"], "tie_word_embeddings": True})
  assert (dense.moe.layers, dense.model.tie_embeddings, dense.model.rope_theta) == ("none", True, 5000.0)


def test_read_safetensors_dtypes(tmp_path):
  from safetensors.torch import save_file
  g = torch.Generator().manual_seed(0)
  t = {"bf": torch.randn(3, 5, generator=g).bfloat16(), "f16": torch.randn(4, generator=g).half(),
       "f32": torch.randn(2, 3, generator=g), "i64": torch.arange(6).reshape(2, 3)}
  save_file(t, str(tmp_path / "x.safetensors"), metadata={"format": "pt"})
  got = read_safetensors(str(tmp_path / "x.safetensors"))
  assert set(got) == set(t)
  for k, v in t.items():
    want = v.float().numpy() if v.is_floating_point() else v.numpy()
    assert got[k].shape == want.shape
    np.testing.assert_array_equal(got[k].astype(want.dtype), want)
  assert got["bf"].dtype == np.float32 and got["i64"].dtype == np.int64


# ----------------------------------------------------------------------------------- parity (a-d)

@pytest.mark.parametrize("tie", [True, False])
def test_qwen2_dense_logits(tmp_path, tie):
  model = _qwen2(tie)
  model.save_pretrained(str(tmp_path))
  keys = set(hf_load.load_hf_state(str(tmp_path)))
  assert ("lm_head.weight" in keys) != tie
  module, params = hf_load.from_pretrained(str(tmp_path))
  assert ("lm_head" in params) != tie
  _assert_logits(module, params, model)


def test_qwen2_bf16_checkpoint(tmp_path):
  model = _qwen2(tie=True, seed=5)
  with torch.no_grad():                   # weights exactly representable in bf16
    for p in model.parameters():
      p.copy_(p.bfloat16().float())
  copy.deepcopy(model).to(torch.bfloat16).save_pretrained(str(tmp_path))   # keeps fp32 rotary buffers
  assert json.load(open(tmp_path / "config.json")).get("dtype", "bfloat16") == "bfloat16"
  module, params = hf_load.from_pretrained(str(tmp_path))
  _assert_logits(module, params, model)


@pytest.mark.slow
def test_qwen2_moe_logits(moe_model, tmp_path):
  model, d = moe_model
  assert "model.layers.3.mlp.experts.6.down_proj.weight" in hf_load.load_hf_state(d)
  module, params = hf_load.from_pretrained(d)
  _assert_logits(module, params, model)
  # padded experts (7 -> 8): zero, never routed to, same logits
  module8, params8 = hf_load.from_pretrained(d, {"moe.expert_multiple": 8})
  for layer in ("layers_2", "layers_3"):
    for w in jax.tree.leaves(params8[layer]["mlp"]):
      if w.ndim == 3:
        assert w.shape[0] == 8 and not np.any(w[7])
  _assert_logits(module8, params8, model)
  config = hf_config.config_from_hf(hf_config.read_hf_config(d))
  config8 = hf_config.apply_overrides(config, {"moe.expert_multiple": 8})
  jax.tree.map(np.testing.assert_array_equal, hf_load.repad_experts(params, config8), params8)
  jax.tree.map(np.testing.assert_array_equal, hf_load.repad_experts(params8, config), params)


def test_qwen2_moe_fused_and_sharded(moe_model, tmp_path):
  model, d = moe_model
  _, ref = hf_load.from_pretrained(d)
  fused, sharded = str(tmp_path / "fused"), str(tmp_path / "sharded")
  model.save_pretrained(fused, save_original_format=False)
  assert "model.layers.3.mlp.experts.gate_up_proj" in hf_load.load_hf_state(fused)
  model.save_pretrained(sharded, max_shard_size="40KB")
  index = json.load(open(os.path.join(sharded, "model.safetensors.index.json")))
  assert len(set(index["weight_map"].values())) > 1
  for path in (fused, sharded):
    _, params = hf_load.from_pretrained(path)
    jax.tree.map(np.testing.assert_array_equal, params, ref)


def _released_dir(src, dst, **extra):
  """Per-expert tensors as the released Apollo-MoE stores them, next to its remote-code config."""
  os.makedirs(dst)
  state = {k: v for k, v in hf_load.load_hf_state(src).items() if ".shared_expert" not in k}
  safetensors.numpy.save_file(state, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
  hf_cfg = json.load(open(os.path.join(src, "config.json")))
  for k in ("rope_parameters", "layer_types", "qkv_bias"):
    hf_cfg.pop(k, None)
  hf_cfg.update(architectures=["UpcyclingQwen2MoeForCausalLM"], model_type="upcycling_qwen2_moe",
                auto_map={"AutoConfig": "configuration_upcycling_qwen2_moe.UpcyclingQwen2MoeConfig"},
                rope_theta=10000.0, num_experts=7, num_experts_per_tok=2, norm_topk_prob=False,
                router_aux_loss_coef=0.0, output_router_logits=False, share_flag=False,
                language_gate=True, attn_init_change=False, decoder_sparse_step=1,
                moe_intermediate_size=48, shared_expert_intermediate_size=48,
                mlp_only_layers=[0, 1], torch_dtype="bfloat16", transformers_version="4.44.2", **extra)
  json.dump(hf_cfg, open(os.path.join(dst, "config.json"), "w"))
  return dst


def test_released_apollo_moe_layout(moe_model, tmp_path):
  model, d = moe_model
  rel = _released_dir(d, str(tmp_path / "rel"))
  config = hf_config.config_from_hf(hf_config.read_hf_config(rel))
  assert (config.moe.routing, config.moe.expert_map, config.moe.layers) == ("hybrid", "family7", "last:2")
  assert not config.moe.shared_expert and config.model.rope_theta == 10000.0
  module, params = hf_load.from_pretrained(rel)
  _assert_logits(module, params, model)     # inference = plain top-k, no language ids needed
  gate = hf_config.config_from_hf({**hf_config.read_hf_config(rel), "language_gate": False})
  assert gate.moe.routing == "topk"


# -------------------------------------------------------------------------------- upcycling (e)

def _moe_config(dense_config, **moe):
  c = hf_config.apply_overrides(dense_config, {"moe." + k: v for k, v in moe.items()})
  return cfg.validate(c)


@pytest.mark.slow
def test_upcycle(dense_model):
  model, d = dense_model
  dense_cfg, dense = hf_load.load_pretrained(d)
  moe_cfg = _moe_config(dense_cfg, layers="last:1", num_experts=7, top_k=2, routing="topk",
                        expert_multiple=8, router_init_std=0.02)
  up = upcycle(dense, dense_cfg, moe_cfg, jax.random.key(0))
  top_d, layers_d = hf_load.split_layers(dense, dense_cfg)
  top_u, layers_u = hf_load.split_layers(up, moe_cfg)
  jax.tree.map(np.testing.assert_array_equal, top_u, top_d)
  jax.tree.map(np.testing.assert_array_equal, layers_u[:2], layers_d[:2])
  ffn, mlp = layers_d[2]["mlp"], layers_u[2]["mlp"]
  jax.tree.map(np.testing.assert_array_equal, {k: v for k, v in layers_u[2].items() if k != "mlp"},
               {k: v for k, v in layers_d[2].items() if k != "mlp"})
  for name in ("gate_proj", "up_proj", "down_proj"):
    w = mlp["experts"][name]
    assert w.shape[0] == 8 and not np.any(w[7])
    for e in range(7):
      np.testing.assert_array_equal(w[e], ffn[name]["kernel"])
  router = mlp["gate"]["kernel"]
  assert router.shape == (32, 7) and 0.015 < router.std() < 0.025 and abs(router.mean()) < 0.01

  # Function: with a zero router every expert has p = 1/7, so the MoE layer outputs exactly
  # 2/7 x the dense FFN: the dense model with that layer's down_proj scaled by 2/7.
  mlp["gate"]["kernel"] = np.zeros_like(router)
  layers_u[2] = {**layers_u[2], "mlp": mlp}
  zero_router = hf_load.finish_tree(hf_load.join_layers(top_u, layers_u, moe_cfg), moe_cfg)
  scaled = jax.tree.map(np.copy, layers_d)
  scaled[2]["mlp"]["down_proj"]["kernel"] *= 2 / 7
  want = _our_logits(build_model(dense_cfg), hf_load.join_layers(top_d, scaled, dense_cfg))
  got = _our_logits(build_model(moe_cfg), zero_router)
  # two experts x 1/7 summed vs one FFN with down_proj x 2/7: other roundings in 3 f32 layers
  assert_close(got, want, dtype=np.float32, terms=_terms(model.config))
  assert np.abs(got - _our_logits(build_model(dense_cfg), dense)).max() > 1e-2
  _assert_logits(build_model(dense_cfg), dense, model)


def test_upcycle_shared_expert(dense_model):
  _, d = dense_model
  dense_cfg, dense = hf_load.load_pretrained(d)
  moe_cfg = _moe_config(dense_cfg, layers="all", num_experts=7, top_k=1, routing="language",
                        shared_expert=True)
  up = upcycle(dense, dense_cfg, moe_cfg, jax.random.key(1))
  _, layers_d = hf_load.split_layers(dense, dense_cfg)
  _, layers_u = hf_load.split_layers(up, moe_cfg)
  for ld, lu in zip(layers_d, layers_u):
    jax.tree.map(np.testing.assert_array_equal, lu["mlp"]["shared_expert"], ld["mlp"])
    assert lu["mlp"]["shared_expert_gate"]["kernel"].shape == (32, 1)


# ----------------------------------------------------------------------------------- errors (f)

def _without(state, *names):
  return {k: v for k, v in state.items() if k not in names}


def _tied(dense_dir):
  return hf_config.apply_overrides(hf_config.config_from_hf(hf_config.read_hf_config(dense_dir)),
                                   {"model.tie_embeddings": True})


IMPORT_ERRORS = {   # name: (call(moe config, moe state, dense dir), exception, message)
    "missing_tensors": (lambda c, st, dd: hf_load.params_from_hf(_without(
        st, "model.layers.1.self_attn.k_proj.bias", "model.layers.3.mlp.experts.4.up_proj.weight"), c),
        ValueError, r"missing 2 tensor.*layers\.1\.self_attn\.k_proj\.bias.*experts\.4\.up_proj"),
    "unexpected_tensor": (lambda c, st, dd: hf_load.params_from_hf(
        {**st, "model.layers.0.mlp.extra_proj.weight": np.zeros((2, 2), np.float32)}, c),
        ValueError, r"1 unexpected tensor.*model\.layers\.0\.mlp\.extra_proj\.weight"),
    "fewer_experts": (lambda c, st, dd: hf_load.params_from_hf(st, hf_config.apply_overrides(c, {"moe.num_experts": 6})),
                      ValueError, r"unexpected tensor.*num_experts=6.*experts\.6\."),
    "architecture": (lambda c, st, dd: hf_config.config_from_hf({**DENSE, "architectures": ["LlamaForCausalLM"]}),
                     ValueError, r"LlamaForCausalLM.*Qwen2ForCausalLM.*Qwen2MoeForCausalLM"),
    "expert_width": (lambda c, st, dd: hf_config.config_from_hf(
        {**MOE, "architectures": ["Qwen2MoeForCausalLM"], "moe_intermediate_size": 16}), ValueError, "moe_intermediate_size=16"),
    "tied_but_different_head": (lambda c, st, dd: hf_load.params_from_hf(hf_load.load_hf_state(dd), _tied(dd)),
                                ValueError, "lm_head.weight differs"),
    "no_safetensors": (lambda c, st, dd: hf_load.load_hf_state(os.path.dirname(dd)), FileNotFoundError, "model.safetensors"),
}


@pytest.mark.parametrize("case", sorted(IMPORT_ERRORS))
def test_import_errors(case, moe_model, dense_model):
  call, exc, match = IMPORT_ERRORS[case]
  _, d = moe_model
  config = hf_config.config_from_hf(hf_config.read_hf_config(d))
  with pytest.raises(exc, match=match):
    call(config, hf_load.load_hf_state(d), dense_model[1])


# ------------------------------------------------------------------------------------- CLI (g)

@pytest.mark.slow
def test_convert_cli_roundtrip(tmp_path):
  from apollo_jax import convert_from_hf
  # dims of configs/tiny.py, so that --config=configs/tiny.py agrees with the checkpoint
  model = _qwen2(tie=True, seed=4, vocab_size=4096, hidden_size=64, intermediate_size=128,
                 num_hidden_layers=4, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
  src, out = str(tmp_path / "hf"), str(tmp_path / "out")
  model.save_pretrained(src)
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
  env.pop("XLA_FLAGS", None)
  run = subprocess.run([sys.executable, "-m", "apollo_jax.convert_from_hf", f"--hf_dir={src}",
                        f"--out={out}", "--upcycle", "--config=configs/tiny.py:routing=topk"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  params, meta = hf_load.load_params(out)
  assert meta["moe"]["layers"] == "last:2" and meta["model"]["hidden_size"] == 64

  import importlib.util
  spec = importlib.util.spec_from_file_location("tiny", os.path.join(REPO, "configs/tiny.py"))
  tiny = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tiny)
  config = tiny.get_config("routing=topk")
  hf_load.check_saved_config(meta, config)
  dense_cfg, dense = hf_load.load_pretrained(src)
  want = upcycle(dense, dense_cfg, config, jax.random.key(config.seed))
  assert jax.tree.structure(params) == jax.tree.structure(want)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), params, want)

  # plain import (no upcycle) through the function, then restore onto abstract targets
  target, p2 = convert_from_hf.convert(src, str(tmp_path / "plain"))
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), p2)
  restored, _ = hf_load.load_params(str(tmp_path / "plain"), abstract)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), restored, p2)
  _assert_logits(build_model(target), restored, model)
  # model dims must agree with --config
  big = tiny.get_config("routing=topk")
  big.model.hidden_size = 128
  with pytest.raises(ValueError, match="hidden_size"):
    convert_from_hf.convert(src, str(tmp_path / "bad"), big, upcycle=True)
  with pytest.raises(ValueError, match="already MoE"):
    shutil.copytree(src, str(tmp_path / "fake_moe"))
    p = tmp_path / "fake_moe" / "config.json"
    json.dump({**json.load(open(p)), **{k: v for k, v in MOE.items() if k.startswith(("num_exp", "mlp_only", "moe_"))},
               "intermediate_size": 128, "moe_intermediate_size": 128, "architectures": ["Qwen2MoeForCausalLM"],
               "model_type": "qwen2_moe"}, open(p, "w"))
    convert_from_hf.convert(str(tmp_path / "fake_moe"), str(tmp_path / "bad2"), config, upcycle=True)
