"""`inference.load` of every path kind (training workdir, convert_from_hf dir, HF dir), params
placed on the mesh, logits and score against stock transformers, and the errors."""

import copy
import json
import os
import shutil

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import lm_fixtures as lf  # noqa: E402
import train_fixtures as tf  # noqa: E402
from tolerance import assert_close, network_terms  # noqa: E402
from apollo_jax import convert_from_hf, inference  # noqa: E402
from apollo_jax.runtime import workdir as workdir_io
from apollo_jax.data.tokenizer import load_tokenizer  # noqa: E402

ONE = jax.devices()[:1]
IDS = np.random.RandomState(1).randint(0, 4096, (3, 10)).astype(np.int32)
TORCH_TERMS = network_terms(4, 32, 48)     # lf.random_hf_moe: 4 layers, hidden 32, (expert) d_ff 48


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return lf.workdir(str(tmp_path_factory.getbasetemp()))


@pytest.fixture(scope="module")
def hf_moe(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("hf_moe"))
  return lf.random_hf_moe(path), path


def _flat(params):
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def test_workdir_config_checkpoints_and_tokenizer(workdir):
  config = workdir_io.read_config(workdir)
  assert (config.model.vocab_size, config.moe.expert_multiple, config.steps, config.global_batch) == (4096, 8, 4, 16)
  assert open(os.path.join(workdir, "tokenizer.model"), "rb").read() == open(lf.SAMPLE_TOKENIZER, "rb").read()
  assert workdir_io.checkpoint_steps(workdir) == [2, 4]
  lm = inference.load(workdir, devices=ONE)
  assert lm.kind == "workdir" and lm.tokenizer.eos_id == 3
  assert lm.config.moe.eval_capacity_factor == 0 and lm.config.moe.routing == "hybrid"
  for step, other in ((4, 2), (2, 4)):
    got = _flat(inference.load(workdir, step=step, devices=ONE).params if step == 2 else lm.params)
    want = {k.replace("['params']", "", 1): v for k, v in tf.restore_params(workdir, step).items()}
    assert got.keys() == want.keys()
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
  assert np.abs(_flat(lm.params)["['norm']['scale']"] - tf.restore_params(workdir, 2)["['norm']['scale']"]).max() > 0


@pytest.mark.slow
def test_params_sharded_on_the_mesh(workdir):
  ref = inference.load(workdir, devices=ONE).logits(IDS)
  lm = inference.load(workdir, mesh=dict(data=1, fsdp=2, expert=2, tensor=2))
  assert dict(lm.mesh.shape) == {"data": 1, "fsdp": 2, "expert": 2, "tensor": 2}
  experts = lm.params["layers_2"]["mlp"]["experts"]["gate_proj"]
  assert experts.sharding.spec[0] == "expert" and len(experts.sharding.device_set) == 8
  assert ("fsdp", "expert") in lm.params["embed_tokens"]["embedding"].sharding.spec   # FSDP over both
  # 8-device sharding reorders the f32 reductions of the 4 layers (d_model 64, d_ff 128); logits ~9
  assert_close(lm.logits(IDS), ref, dtype=np.float32, terms=network_terms(4, 64, 128))
  default = inference.load(workdir)           # config.mesh (fsdp=-1) over all 8 devices
  assert dict(default.mesh.shape)["fsdp"] == 8


@pytest.mark.slow
def test_hf_and_converted_dirs_logits_and_score(hf_moe, tmp_path):
  model, path = hf_moe
  tok = load_tokenizer(lf.SAMPLE_TOKENIZER)
  lm = inference.load(path, devices=ONE, tokenizer=lf.SAMPLE_TOKENIZER)
  assert lm.kind == "hf" and lm.config.moe.routing == "topk"
  ids = np.random.RandomState(2).randint(0, 4096, (2, 9))
  ref = lf.torch_logits(model, ids)
  assert_close(lm.logits(ids), ref, dtype=np.float32, terms=TORCH_TERMS)   # XLA vs torch kernels
  assert np.abs(ref).max() > 1.0
  # score = summed log-softmax of the continuation tokens (strings: pieces tokenised separately)
  prompts = ["User:What is a fever?\nAssistant:", "Hola", "Der Patient hat Fieber und Husten"]
  conts = ["A high temperature.", " amigo", ""]
  want = []
  for p, c in zip(prompts, conts):
    pi, ci = tok.encode(p), tok.encode(c)
    logp = torch.log_softmax(torch.tensor(lf.torch_logits(model, [pi + ci])[0], dtype=torch.float64), -1).numpy()
    want.append(sum(logp[len(pi) - 1 + j, t] for j, t in enumerate(ci)))
  got = lm.score(prompts, conts, batch_size=2)
  # the logits' rounding, then a log-softmax over 4096 and a sum over <= 10 continuation tokens
  assert_close(got, want, dtype=np.float32, terms=TORCH_TERMS + 4096 + 10)
  assert got[2] == 0.0 and got[0] < -1
  # another batch size: other padding and batch shapes, so other reduction orders
  assert_close(lm.score([tok.encode(p) for p in prompts], [tok.encode(c) for c in conts]), got,
               dtype=np.float32, terms=TORCH_TERMS + 4096 + 10)
  # convert_from_hf output: same params, same logits
  convert_from_hf.convert(path, str(tmp_path / "conv"))
  conv = inference.load(str(tmp_path / "conv"), devices=ONE)
  assert conv.kind == "converted" and conv.tokenizer is None
  np.testing.assert_array_equal(conv.logits(ids), lm.logits(ids))


def test_language_routing_needs_a_language():
  config = lf.tiny_config(expert_multiple=0)
  config.moe.routing, config.moe.top_k, config.moe.shared_expert = "language", 1, True
  lm = inference.from_params(config, lf.randomized_params(config), load_tokenizer(lf.SAMPLE_TOKENIZER), ONE)
  with pytest.raises(ValueError, match="language_ids"):
    lm.logits(IDS)
  with pytest.raises(ValueError, match="language='xx' is not one of"):
    lm.score(["a"], ["b"], language="xx")
  en = lm.logits(IDS, language_ids=np.zeros_like(IDS))
  assert np.isfinite(en).all() and np.abs(en - lm.logits(IDS, language_ids=np.ones_like(IDS))).max() > 1e-3


def _untrained(tmp_path, workdir, checkpoints=False):
  os.makedirs(tmp_path / "untrained" / ("checkpoints" if checkpoints else ""), exist_ok=True)
  shutil.copy(os.path.join(workdir, "config.json"), tmp_path / "untrained")
  return str(tmp_path / "untrained"), {}


def _llama(tmp_path, hf_dir):
  bad = str(tmp_path / "llama")
  shutil.copytree(hf_dir, bad)
  json.dump({**json.load(open(os.path.join(bad, "config.json"))), "architectures": ["LlamaForCausalLM"]},
            open(os.path.join(bad, "config.json"), "w"))
  return bad, {}


def _made(tmp_path, *parts):
  os.makedirs(tmp_path.joinpath(*parts))
  return str(tmp_path / parts[0]), {}


LOAD_ERRORS = {   # name: (make(tmp_path, workdir, hf_dir) -> (path, load kwargs), exception, message)
    "missing": (lambda t, w, h: (str(t / "nope"), {}), FileNotFoundError, "does not exist"),
    "empty_dir": (lambda t, w, h: _made(t, "empty"), FileNotFoundError, "not a model dir"),
    "config_only": (lambda t, w, h: _untrained(t, w), FileNotFoundError, "nothing was trained"),
    "no_checkpoint": (lambda t, w, h: _untrained(t, w, True), FileNotFoundError, "no complete checkpoint yet"),
    "no_config": (lambda t, w, h: _made(t, "old", "checkpoints"), FileNotFoundError, "no config.json"),
    "missing_step": (lambda t, w, h: (w, {"step": 3}), FileNotFoundError,
                     r"no complete checkpoint at step 3; available: \[2, 4\]"),
    "llama": (lambda t, w, h: _llama(t, h), ValueError, "unsupported architecture.*LlamaForCausalLM"),
}


@pytest.mark.parametrize("case", sorted(LOAD_ERRORS))
def test_load_errors(case, workdir, hf_moe, tmp_path):
  make, exc, match = LOAD_ERRORS[case]
  path, kwargs = make(tmp_path, workdir, hf_moe[1])
  with pytest.raises(exc, match=match):
    inference.load(path, **kwargs)


@pytest.fixture(scope="module")
def hf_lm(hf_moe):
  """An HF dir without tokenizer files, loaded on one device."""
  return inference.load(hf_moe[1], devices=ONE)


def _limited(lm, n=20):
  lm.max_len = n
  return lm


def _chat(lm, messages):
  lm.tokenizer = load_tokenizer(lf.SAMPLE_TOKENIZER)
  return lm.chat(messages)


CALL_ERRORS = {   # name: (call(lm), message)
    "no_tokenizer": (lambda lm: lm.generate(["hello"]), "has no tokenizer"),
    "id_out_of_vocab": (lambda lm: lm.generate([[1, 5000]]), r"ids in \[0, 4096\)"),
    "mixed_inputs": (lambda lm: lm.score(["a", [1]], ["b", [2]]), "all strings or all token-id lists"),
    "empty_prompt": (lambda lm: lm.score([[]], [[1]]), "prompts\\[0\\] is empty"),
    "count_mismatch": (lambda lm: lm.score([[1], [2]], [[3]]), "2 prompts but 1 continuations"),
    "no_new_tokens": (lambda lm: lm.generate([[1, 2]], max_new_tokens=0), "max_new_tokens=0"),
    "negative_temperature": (lambda lm: lm.generate([[1, 2]], temperature=-1.0), "temperature=-1.0 must be >= 0"),
    "too_long_generate": (lambda lm: _limited(lm).generate([list(range(15))], max_new_tokens=10),
                          r"prompts\[0\] \(15 tokens\) \+ max_new_tokens is 25 tokens, longer than the "
                          "model's limit of 20"),
    "too_long_logits": (lambda lm: _limited(lm).logits(np.zeros((1, 21), np.int32)), "input is 21 tokens"),
    "chat_roles": (lambda lm: _chat(lm, [{"role": "system", "content": "x"}]), "must alternate user/assistant"),
    "chat_content": (lambda lm: _chat(lm, [{"role": "user"}]), "chat message 0 has no string 'content'"),
}


@pytest.mark.parametrize("case", sorted(CALL_ERRORS))
def test_call_errors(case, hf_lm):
  call, match = CALL_ERRORS[case]
  lm = copy.copy(hf_lm)                  # cases that set max_len or a tokenizer leave the fixture as is
  with pytest.raises(ValueError, match=match):
    call(lm)
