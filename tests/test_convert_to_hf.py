"""`convert_to_hf`: stock transformers loads the export with no load warnings and computes our
logits; the exported tokenizer gives our ids in all 50 languages and renders the training chat
format; export -> convert_from_hf is exact; bad input has clear errors."""

import json
import os

import jax
import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import lm_fixtures as lf  # noqa: E402
from tolerance import assert_close, network_terms  # noqa: E402
from apollo_jax import convert_from_hf, convert_to_hf, inference  # noqa: E402
from apollo_jax.model.size import count_params  # noqa: E402
from apollo_jax.hf import config as hf_config
from apollo_jax.hf import load as hf_load
from apollo_jax.hf import export as hf_export
from apollo_jax import languages  # noqa: E402
from apollo_jax.hf import tokenizer as tokenizer_export
from apollo_jax.data import chat, records  # noqa: E402
from apollo_jax.data.tokenizer import load_tokenizer  # noqa: E402

IDS = np.random.RandomState(0).randint(0, 4096, (2, 13)).astype(np.int32)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """(LM of the workdir, its fp32 export dir)."""
  workdir = lf.workdir(str(tmp_path_factory.getbasetemp()))
  out = str(tmp_path_factory.mktemp("trained_export"))
  files = convert_to_hf.convert(workdir, out, dtype="float32")
  assert "model.safetensors" in files and "tokenizer.json" in files
  return inference.load(workdir, devices=jax.devices()[:1]), out


def _check_loads(lm, path):
  model, info = lf.hf_model(path)
  assert not any(info.values()), info           # no missing / unexpected / mismatched weights
  ref = lf.torch_logits(model, IDS)
  # torch vs XLA kernels, f32: every reduction of the tiny decoder in another order
  m = lm.config.model
  assert_close(lm.logits(IDS), ref, dtype=np.float32, terms=network_terms(m.num_layers, m.hidden_size,
                                                                          m.intermediate_size))
  return model, ref


@pytest.mark.slow
def test_trained_hybrid_export(trained):
  lm, out = trained
  assert lm.kind == "workdir" and lm.config.moe.num_experts == 7
  assert lm.params["layers_2"]["mlp"]["experts"]["gate_proj"].shape[0] == 8      # padded on the mesh
  model, ref = _check_loads(lm, out)
  assert type(model).__name__ == "Qwen2MoeForCausalLM"
  assert np.abs(ref).max() > 1.0
  c = json.load(open(os.path.join(out, "config.json")))
  assert c["architectures"] == ["Qwen2MoeForCausalLM"] and c["mlp_only_layers"] == [0, 1]
  assert (c["num_experts"], c["num_experts_per_tok"], c["norm_topk_prob"]) == (7, 2, False)
  assert c["moe_intermediate_size"] == c["intermediate_size"] == 128 and c["vocab_size"] == 4096
  assert (c["shared_expert_intermediate_size"], c["decoder_sparse_step"]) == (0, 1)
  state = hf_load.load_hf_state(out)
  assert "model.layers.3.mlp.experts.6.up_proj.weight" in state and "lm_head.weight" not in state
  assert "model.layers.3.mlp.experts.7.up_proj.weight" not in state            # padding dropped
  assert state["model.layers.3.mlp.shared_expert.up_proj.weight"].shape == (0, 64)
  assert not np.any(state["model.layers.3.mlp.shared_expert_gate.weight"])
  gen = json.load(open(os.path.join(out, "generation_config.json")))
  assert gen["eos_token_id"] == lm.tokenizer.eos_id and gen["do_sample"] is False
  card = open(os.path.join(out, "README.md")).read()
  counts = count_params(lm.config)
  for text in ("Qwen2MoeForCausalLM", "MoE layers [2, 3]", "Hybrid-k", f"{counts['total_params']:,} total",
               f"{counts['active_params']:,} active", "Swahili (sw)", "4 steps x 16 rows"):
    assert text in card, text
  # The front matter as a YAML 1.1 reader sees it (the Hub's, gguf's): every language a string.
  yaml = pytest.importorskip("yaml")
  front = yaml.safe_load(card.split("---\n")[1])
  assert front["language"] == list(languages.CODES) and "no" in front["language"]


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["dense", "last3", "all"])
def test_variant_exports(variant, tmp_path):
  lm = lf.randomized(variant)
  lf.export(lm, str(tmp_path))
  model, ref = _check_loads(lm, str(tmp_path))
  assert np.abs(ref).max() > 1.0
  c = json.load(open(tmp_path / "config.json"))
  if variant == "dense":
    assert type(model).__name__ == "Qwen2ForCausalLM" and "num_experts" not in c
    assert "lm_head.weight" in hf_load.load_hf_state(str(tmp_path))                  # untied head
  else:
    assert c["mlp_only_layers"] == ([0] if variant == "last3" else [])


@pytest.mark.slow
def test_roundtrip_exact_and_sharded_bf16(trained, tmp_path):
  lm, out = trained
  # fp32 export -> convert_from_hf (padding of the training mesh) -> identical params
  config, back = convert_from_hf.convert(out, str(tmp_path / "back"), config=lm.config)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), lm.params, back)
  reloaded = inference.load(str(tmp_path / "back"), devices=jax.devices()[:1], tokenizer=lm.tokenizer)
  assert reloaded.kind == "converted"
  np.testing.assert_array_equal(reloaded.logits(IDS), lm.logits(IDS))
  # bf16, sharded with an index: every tensor is our fp32 weight rounded to bf16
  sharded = str(tmp_path / "bf16")
  files = convert_to_hf.convert(out, sharded, dtype="bfloat16", max_shard_size="100KB")
  index = json.load(open(os.path.join(sharded, "model.safetensors.index.json")))
  shards = sorted(set(index["weight_map"].values()))
  assert len(shards) > 2 and set(shards) <= set(files)
  for name in shards:                            # at most the limit, unless one tensor is larger
    keys = [k for k, v in index["weight_map"].items() if v == name]
    assert os.path.getsize(os.path.join(sharded, name)) <= 100_000 + 8 * 1024 or len(keys) == 1
  want, got = hf_load.load_hf_state(out), hf_load.load_hf_state(sharded)
  assert set(got) == set(want)
  for k, v in want.items():
    np.testing.assert_array_equal(got[k], v.astype(ml_dtypes.bfloat16).astype(np.float32))
  assert json.load(open(os.path.join(sharded, "config.json")))["dtype"] == "bfloat16"
  model, info = transformers.AutoModelForCausalLM.from_pretrained(sharded, output_loading_info=True)
  assert not any(info.values()) and next(model.parameters()).dtype == torch.bfloat16


@pytest.mark.slow
def test_tokenizer_ids_all_languages(tmp_path):
  lm = lf.randomized("hybrid8")
  out = lf.export(lm, str(tmp_path))
  ours = load_tokenizer(lf.SAMPLE_TOKENIZER)
  theirs = transformers.AutoTokenizer.from_pretrained(out)
  samples, _ = records.read_dataset(os.path.join(lf.REPO, "data/sample/apollo_moe_sample.json"), False)
  assert len({s.source.split("_")[1] for s in samples}) == 50
  texts = [t for s in samples for t in s.turns] + [
      "a  b", "  x ", "x\n\n  y", "1234 5.67", "User:hi\nAssistant:ok", "😀 ∮ 𝔘", "tab\there", ""]
  for text in texts:
    ids = ours.encode(text)
    assert theirs(text, add_special_tokens=False)["input_ids"] == ids, text[:60]
    assert theirs.decode(ids) == text
  assert (theirs.eos_token_id, theirs.pad_token_id) == (ours.eos_id, ours.pad_id)
  # our own loader reads the exported tokenizer.json with the same ids and EOS
  mine = inference.load(out, devices=jax.devices()[:1]).tokenizer
  assert mine.eos_id == ours.eos_id and mine.encode(texts[0]) == ours.encode(texts[0])


def test_chat_template_and_pipeline(tmp_path):
  lm = lf.randomized("hybrid8")
  out = lf.export(lm, str(tmp_path))
  tok = transformers.AutoTokenizer.from_pretrained(out)
  turns = ["What is a fever?", "A high temperature.", "Is it bad?", "Sometimes."]
  msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
  assert tok.apply_chat_template(msgs, tokenize=False) == chat.template_text(turns, tok.eos_token)
  prompt = tok.apply_chat_template(msgs[:3], tokenize=False, add_generation_prompt=True)
  assert prompt == "User:What is a fever?\nAssistant:A high temperature.\nUser:Is it bad?\nAssistant:"
  ids = tok.apply_chat_template(msgs[:3], add_generation_prompt=True, return_dict=True)["input_ids"]
  assert list(ids) == lm.chat_prompt(msgs[:3])
  full_ids, _ = chat.ChatEncoder(lm.tokenizer)(turns[:2])
  assert list(tok.apply_chat_template(msgs[:2], return_dict=True)["input_ids"]) == full_ids.tolist()
  with pytest.raises(Exception, match="system prompt"):
    tok.apply_chat_template([{"role": "system", "content": "x"}] + msgs[:1], tokenize=False)
  pipe = transformers.pipeline("text-generation", model=out, dtype=torch.float32)
  res = pipe(msgs[:1], max_new_tokens=3, do_sample=False)
  assert res[0]["generated_text"][-1]["role"] == "assistant"


def _unigram_model(tmp_path):
  import sentencepiece as spm
  spm.SentencePieceTrainer.train(sentence_iterator=iter(["a b c d e f g"] * 50), model_prefix=str(tmp_path / "uni"),
                                 vocab_size=12, model_type="unigram", minloglevel=2)
  return str(tmp_path / "uni.model")


ERRORS = {   # name: (call(lm, workdir, tmp_path), exception, message)
    "language_routing": (lambda lm, out, t: hf_export.check_exportable(
        hf_config.apply_overrides(lm.config, {"moe.routing": "language"})), ValueError, "routing='language'.*--force_topk"),
    "shard_size": (lambda lm, out, t: convert_to_hf.convert(out, str(t / "x"), max_shard_size="5 bananas"),
                   ValueError, "max_shard_size='5 bananas'"),
    "out_not_empty": (lambda lm, out, t: convert_to_hf.convert(out, out), FileExistsError, "not empty"),
    "missing_model": (lambda lm, out, t: convert_to_hf.convert(str(t / "nope"), str(t / "y")),
                      FileNotFoundError, "does not exist"),
    "unigram_tokenizer": (lambda lm, out, t: tokenizer_export.sentencepiece_to_tokenizers(_unigram_model(t)),
                          ValueError, "cannot convert this sentencepiece model"),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_errors(case, trained, tmp_path):
  call, exc, match = ERRORS[case]
  lm, out = trained
  with pytest.raises(exc, match=match):
    call(lm, out, tmp_path)


def test_force_topk_exports_language_routing(trained):
  lm, _ = trained
  hf_export.check_exportable(hf_config.apply_overrides(lm.config, {"moe.routing": "language"}), force_topk=True)


def test_model_card_front_matter_is_the_same_to_a_yaml_1_1_reader():
  yaml = pytest.importorskip("yaml")                # PyYAML's safe_load is YAML 1.1
  card = hf_export.model_card(lf.randomized("hybrid8"), "float32")
  assert card.startswith("---\n")
  front = yaml.safe_load(card.split("---\n")[1])
  assert front == hf_export.FRONT_MATTER
  assert all(isinstance(c, str) for c in front["language"]) and "no" in set(front["language"])
  # the rule itself on the values YAML 1.1 would reinterpret
  tricky = {"a": ["no", "on", "yes", "off", "y", "n", "true", "null", "~", "1e3", "0x1F", "12:30", ""]}
  assert yaml.safe_load("\n".join(hf_export.front_matter(tricky))) == tricky
