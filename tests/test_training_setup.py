"""training/setup.py: one command from an HF checkpoint (init_from a dense or MoE HF dir, its
tokenizer.json), the big configs' preflight, epochs to steps."""

import json
import os
import re

import numpy as np
import pytest

import data_fixtures
import train_fixtures as tf
from apollo_jax import config as cfg
from apollo_jax.training import optimizer
from apollo_jax.training import setup
from apollo_jax.runtime import sharding
from apollo_jax.training import step as ts
from apollo_jax.model import transformer

_config, _flat = tf.tiny_config, tf.flat

HF_DIMS = dict(vocab_size=640, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
               num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6,
               rms_norm_eps=1e-6)


def _qwen2_tensors(rng, V=640, H=64, I=128, L=4, heads=4, kv=2):
  """Random tensors under the names and [out, in] shapes of HF Qwen2 (tied embeddings)."""
  hd = H // heads
  shapes = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}
  for i in range(L):
    p = f"model.layers.{i}."
    shapes.update({p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
                   p + "self_attn.q_proj.weight": (heads * hd, H), p + "self_attn.q_proj.bias": (heads * hd,),
                   p + "self_attn.k_proj.weight": (kv * hd, H), p + "self_attn.k_proj.bias": (kv * hd,),
                   p + "self_attn.v_proj.weight": (kv * hd, H), p + "self_attn.v_proj.bias": (kv * hd,),
                   p + "self_attn.o_proj.weight": (H, heads * hd), p + "mlp.gate_proj.weight": (I, H),
                   p + "mlp.up_proj.weight": (I, H), p + "mlp.down_proj.weight": (H, I)})
  return {k: (0.05 * rng.standard_normal(v)).astype(np.float32) for k, v in shapes.items()}


@pytest.fixture(scope="module")
def hf_dense(tmp_path_factory):
  """A tiny dense Qwen2 HF dir as save_pretrained lays it out (config.json, model.safetensors,
  tokenizer.json), written without torch so that it costs no torch import."""
  import safetensors.numpy
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, trainers
  d = str(tmp_path_factory.mktemp("qwen2_dense"))
  hf_config = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
               "max_position_embeddings": 4096, "initializer_range": 0.02, "use_sliding_window": False,
               "torch_dtype": "float32", **HF_DIMS}
  with open(os.path.join(d, "config.json"), "w") as f:
    json.dump(hf_config, f)
  sd = _qwen2_tensors(np.random.default_rng(0))
  safetensors.numpy.save_file(sd, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  convs = data_fixtures.make_conversations(0)
  lines = [t for items in convs.values() for turns in items for t in turns] + ["User:", "\nAssistant:"]
  tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>"],
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok.save(os.path.join(d, "tokenizer.json"))
  return d, sd


# ---------------------------------------------------------------------- one command from HF

@pytest.mark.slow
def test_train_from_dense_hf_dir_one_command(hf_dense, data, jit_cache, tmp_path):
  """init_from=<dense HF dir>, no tokenizer given, steps from epochs: the run upcycles on the fly,
  tokenises with the dir's tokenizer.json and (lr=0) ends on exactly the HF weights."""
  hf_dir, sd = hf_dense
  workdir = str(tmp_path / "run")
  flags = tf.flags(data, 1, init_from=hf_dir, data__tokenizer="", optim__lr=0.0, eval_every=0,
                   epochs=0.5, ckpt__every=1000)
  result = tf.check_ok(tf.run(workdir, flags, 1, jit_cache))
  assert f"data.tokenizer: {hf_dir}/tokenizer.json" in result.stdout
  m = re.search(r"epochs=0.5: steps=(\d+) \((\d+) packed rows in the first epoch, global_batch=16\)",
                result.stdout)
  assert m, result.stdout[-2000:]
  steps, rows = int(m.group(1)), int(m.group(2))
  assert steps == max(1, -(-rows // 32)) and f"step {steps}/{steps}" in result.stdout
  saved = json.load(open(os.path.join(workdir, "config.json")))
  assert saved["steps"] == steps and saved["data"]["tokenizer"].endswith("tokenizer.json")
  p = tf.restore_params(workdir, steps)
  np.testing.assert_array_equal(p["['embed_tokens']['embedding']"], sd["model.embed_tokens.weight"])
  np.testing.assert_array_equal(p["['layers_0']['self_attn']['q_proj']['kernel']"][1],
                                sd["model.layers.1.self_attn.q_proj.weight"].T)
  for layer in (2, 3):                     # MoE layers: 7 copies of the dense FFN + 1 zero pad
    experts = p[f"['layers_{layer}']['mlp']['experts']['up_proj']"]
    assert experts.shape[0] == 8 and not experts[7].any()
    for e in range(7):
      np.testing.assert_array_equal(experts[e], sd[f"model.layers.{layer}.mlp.up_proj.weight"].T)


def test_init_kind_and_hf_mismatch_errors(hf_dense, tmp_path):
  hf_dir, _ = hf_dense
  assert setup.init_kind(hf_dir) == "hf"
  with pytest.raises(FileNotFoundError, match="init_from .* does not exist: expected a convert_from_hf output dir"):
    setup.init_kind(str(tmp_path / "nope"))
  with pytest.raises(FileNotFoundError, match="is not a model dir: expected"):
    setup.init_kind(str(tmp_path))
  (tmp_path / "checkpoints").mkdir()
  (tmp_path / "config.json").write_text('{"model": {}, "moe": {}}')
  with pytest.raises(FileNotFoundError, match="is a training workdir .*; expected a convert_from_hf"):
    setup.init_kind(str(tmp_path))
  with pytest.raises(ValueError, match=r"model dimensions differ.*hidden_size.*\(64, 32\)"):
    setup.hf_params(hf_dir, _config(model__hidden_size=32))


def test_moe_hf_dir_loads_as_is_onto_the_shardings(tmp_path):
  """A Qwen2-MoE HF dir (7 experts in the last 2 layers) is used as is: params land on an
  fsdp=4 x expert=2 mesh, experts padded to 8, every tensor equal to the file's."""
  import safetensors.numpy
  rng = np.random.default_rng(1)
  sd = _qwen2_tensors(rng)
  for i in (2, 3):
    p = f"model.layers.{i}.mlp."
    for n in ("gate_proj", "up_proj", "down_proj"):
      sd.pop(p + n + ".weight")
    sd[p + "gate.weight"] = rng.standard_normal((7, 64)).astype(np.float32)
    for e in range(7):
      for n, shape in (("gate_proj", (128, 64)), ("up_proj", (128, 64)), ("down_proj", (64, 128))):
        sd[f"{p}experts.{e}.{n}.weight"] = rng.standard_normal(shape).astype(np.float32)
  hf_config = {"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "num_experts": 7,
               "num_experts_per_tok": 2, "decoder_sparse_step": 1, "mlp_only_layers": [0, 1],
               "moe_intermediate_size": 128, "shared_expert_intermediate_size": 0, **HF_DIMS}
  (tmp_path / "config.json").write_text(json.dumps(hf_config))
  safetensors.numpy.save_file(sd, str(tmp_path / "model.safetensors"))
  c = _config(init_from=str(tmp_path), mesh__fsdp=4, mesh__expert=2)
  mesh = sharding.make_mesh(c)
  with sharding.activate(mesh):
    model, tx = transformer.build_model(c, mesh), optimizer.make_optimizer(c)
    abstract, shardings, _ = ts.state_shardings(model, c, tx, mesh)
  params = setup.load_params(c, abstract["params"], shardings["params"])
  flat = _flat(params)
  gate = params["layers_3"]["mlp"]["experts"]["gate_proj"]
  assert gate.sharding == shardings["params"]["layers_3"]["mlp"]["experts"]["gate_proj"]
  assert flat["['layers_3']['mlp']['experts']['gate_proj']"].shape == (8, 64, 128)
  for e in range(7):
    np.testing.assert_array_equal(flat["['layers_3']['mlp']['experts']['down_proj']"][e],
                                  sd[f"model.layers.3.mlp.experts.{e}.down_proj.weight"].T)
  assert not flat["['layers_2']['mlp']['experts']['up_proj']"][7].any()
  np.testing.assert_array_equal(flat["['layers_2']['mlp']['gate']['kernel']"], sd["model.layers.2.mlp.gate.weight"].T)
  np.testing.assert_array_equal(flat["['layers_0']['mlp']['down_proj']['kernel']"][1],
                                sd["model.layers.1.mlp.down_proj.weight"].T)
  with pytest.raises(ValueError, match=r"saved params have MoE layers \(2, 3\).*config wants \(1, 2, 3\)"):
    setup.hf_params(str(tmp_path), _config(moe__layers="last:3"))


# ----------------------------------------------------------------------------- preflight, epochs

def test_big_configs_list_what_they_need():
  for name in ("apollo_moe_0p5b", "apollo_2b", "apollo_moe_7b"):
    with pytest.raises(ValueError) as e:
      setup.prepare(cfg.load(name))
    msg = str(e.value)
    for needed in ("--config.init_from=DIR", "--config.allow_random_init=True", "data.tokenizer",
                   "--config.data.train_files=FILES", "hf download"):
      assert needed in msg, (name, needed)
  c = cfg.load("apollo_2b")
  c.data.train_files, c.allow_random_init = "x.json", True
  with pytest.raises(ValueError, match=r"needs: \(1\) the tokenizer") as e:
    setup.prepare(c)
  assert "init_from" not in str(e.value).split("(1)")[1].split("by default")[0]
  c.data.tokenizer = "tok.json"
  setup.prepare(c)                     # everything given: no error
  setup.prepare(cfg.load("tiny"))      # the demo config needs nothing


def test_tokenizer_defaults_to_init_from(hf_dense):
  hf_dir, _ = hf_dense
  for given in ("", setup.SAMPLE_TOKENIZER):
    c = _config(init_from=hf_dir)
    c.data.tokenizer = given
    setup.prepare(c)
    assert c.data.tokenizer == os.path.join(hf_dir, "tokenizer.json")
  c = _config(init_from=hf_dir, data__tokenizer="mine.model")
  setup.prepare(c)
  assert c.data.tokenizer == "mine.model"  # an explicit tokenizer wins


def test_epochs_to_steps():
  class D:
    stats = {"rows_per_epoch": 1000}
    steps_for_epochs = lambda self, epochs: int(epochs * 100)
  c = _config(epochs=1.5, global_batch=32)
  assert setup.apply_epochs(c, D()) == 150 == c.steps
  c = _config(epochs=0.0, steps=7)
  assert setup.apply_epochs(c, D()) is None and c.steps == 7
  with pytest.raises(ValueError, match="epochs must be >= 0"):
    cfg.validate(_config(epochs=-1.0))


# ----------------------------------------------------------------------------- resume safety

@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
  import lm_fixtures
  return lm_fixtures.workdir(str(tmp_path_factory.mktemp("resume"))), lm_fixtures


def _copy(src, dst):
  import shutil
  shutil.copytree(src, dst)
  return str(dst)


def test_resume_with_other_settings_is_one_paragraph_and_changes_nothing(trained_workdir, tmp_path):
  from apollo_jax.training import loop
  src, lf = trained_workdir
  work = _copy(src, tmp_path / "w")
  before = {n: open(os.path.join(work, n), "rb").read() for n in ("config.json", "tokenizer.model")}
  c = lf.tiny_config(moe_layers="last:3")
  c.model.hidden_size, c.moe.num_experts = 32, 7
  other_tok = tmp_path / "other.model"
  other_tok.write_bytes(before["tokenizer.model"] + b"x")
  c.data.tokenizer = str(other_tok)
  with pytest.raises(ValueError, match=(r"cannot resume .*model.hidden_size: checkpoint 64, this config 32"
                                        r".*moe.layers: checkpoint 'last:2' \(layers \[2, 3\]\), this config "
                                        r"'last:3' \(layers \[1, 2, 3\]\).*data.tokenizer: .*other.model is not "
                                        r"the tokenizer")) as e:
    loop.train(c, work)
  assert "\n" not in str(e.value)
  for name, data in before.items():                      # the workdir is as it was
    assert open(os.path.join(work, name), "rb").read() == data


def test_resume_with_the_same_settings_passes_the_check(trained_workdir):
  src, lf = trained_workdir
  c = lf.tiny_config(**lf.VARIANTS["hybrid8"])
  c.steps, c.global_batch = 9, 8                          # run length and batch may change
  setup.check_resume(src, c)
