"""Routing analysis: counting on hand-built routing, padding, the specialization number, heatmap
PNGs, and the analysis of a language-routed model (every language on its own expert)."""

import os

import jax
import matplotlib.image
import numpy as np
import pytest

from apollo_jax import inference, languages
from apollo_jax.analysis import routing
from apollo_jax.analysis import routing_stats
from apollo_jax.analysis import plots
from apollo_jax.data import tokenizer as tok_lib
from tolerance import assert_close

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EN, ZH, AR = (languages.index(c) for c in ("en", "zh", "ar"))


def test_counting_known_assignments():
  # one row of 4 tokens (en, en, zh, zh), top-2, 3 experts, 2 MoE layers (decoder layers 1 and 3)
  lang = np.array([[EN, EN, ZH, ZH]])
  chosen = {1: np.array([[[0, 1], [0, 2], [2, 1], [2, -1]]]),    # -1: an empty slot, not counted
            3: np.array([[[1, 0], [1, 0], [1, 0], [1, 0]]])}
  c = routing_stats.RoutingCounts([1, 3], len(languages.CODES), 3)
  c.add(chosen, lang, np.ones_like(lang))
  frac, per_tok = c.fraction(), c.per_token()
  np.testing.assert_allclose(frac[0, EN], [2 / 4, 1 / 4, 1 / 4])
  np.testing.assert_allclose(frac[0, ZH], [0, 1 / 3, 2 / 3])
  np.testing.assert_allclose(frac[1, EN], [0.5, 0.5, 0])
  np.testing.assert_allclose(per_tok[0, EN], [1.0, 0.5, 0.5])
  np.testing.assert_allclose(per_tok[0, ZH], [0, 0.5, 1.0])
  assert_close(frac[:, [EN, ZH]].sum(-1), 1.0, dtype=np.float64, terms=3)   # float64 sum of 3 shares
  assert list(c.present()) == [EN, ZH] and c.tokens[0, EN] == 2
  res = routing_stats.summarize(c, "language")
  assert res["groups"] == ["en", "zh"]
  # mean of en and zh rows; not rounding noise: the summary rounds to 6 decimals (error <= 5e-7)
  np.testing.assert_allclose(res["average"][0], [0.25, 7 / 24, 11 / 24], rtol=0, atol=5e-7)
  assert res["dominant_expert"]["zh"] == [2, 0] and res["dominant_share"]["zh"] == [1.0, 1.0]
  fam = routing_stats.summarize(routing_stats.regroup(c, languages.expert_map("family7"), 7), "family")
  assert fam["groups"] == ["Sino-Tibetan", "Indo-European"]
  np.testing.assert_allclose(fam["fraction"]["Indo-European"], frac[:, EN])
  assert res["specialization"][1] == 0.0 and res["specialization"][0] > 0.3


def test_padding_is_never_counted():
  lang = np.array([[EN, EN, EN], [ZH, ZH, ZH]])
  mask = np.array([[1, 1, 0], [1, 0, 0]])
  chosen = {0: np.array([[[0, 1], [0, 1], [2, 3]], [[1, 2], [3, 3], [3, 3]]])}  # pads name experts
  c = routing_stats.RoutingCounts([0], len(languages.CODES), 4)
  c.add(chosen, lang, mask)
  assert c.tokens[0, EN] == 2 and c.tokens[0, ZH] == 1 and c.assign.sum() == 6
  np.testing.assert_allclose(c.fraction()[0, EN], [0.5, 0.5, 0, 0])
  np.testing.assert_allclose(c.fraction()[0, ZH], [0, 0.5, 0.5, 0])


def _spec_close(value, want, groups, experts):
  """float64 mutual information: entropies over groups x experts of size ~log(G E), a difference
  divided by log G (so a 0 result is still computed from terms of that size)."""
  assert_close(value, want, dtype=np.float64, terms=groups * experts,
               scale=np.log(groups * experts) / np.log(groups))


def test_specialization_constructed_cases():
  E = 6
  uniform = np.full((4, E), 1 / E)
  _spec_close(routing_stats.specialization(uniform), 0.0, 4, E)
  same = np.tile([0.5, 0.3, 0.2, 0, 0, 0], (4, 1))        # skewed, but the same for every group
  _spec_close(routing_stats.specialization(same), 0.0, 4, E)
  own = np.eye(4, E)                                       # top-1: group determines the expert
  _spec_close(routing_stats.specialization(own), 1.0, 4, E)
  pairs = np.kron(np.eye(3), [0.5, 0.5])                   # top-2, disjoint expert pairs
  _spec_close(routing_stats.specialization(pairs), 1.0, 3, 6)
  ts = np.linspace(0, 1, 11)
  s = [routing_stats.specialization((1 - t) * uniform + t * own) for t in ts]
  _spec_close(s[0], 0.0, 4, E)
  _spec_close(s[-1], 1.0, 4, E)
  assert all(b > a for a, b in zip(s, s[1:])), s
  # the finite-sample floor: routing independent of the group scores near its chance level
  rng = np.random.default_rng(0)
  counts = np.stack([rng.multinomial(400, [0.3, 0.3, 0.2, 0.1, 0.05, 0.05]) for _ in range(5)])
  chance = routing_stats.chance_specialization(counts)
  assert 0 < chance < 0.05 and routing_stats.specialization(counts) < 3 * chance


def _fake_result(L=2, E=3, K=2, groups=("Sino-Tibetan", "Indo-European", "Afro-Asian")):
  frac = {g: [[1 / E] * E] * L for g in groups}
  return {"moe_layers": list(range(L)), "num_experts": E, "top_k": K, "family": {
      "groups": list(groups), "tokens": {g: 10 for g in groups}, "fraction": frac,
      "per_token": frac, "average": [[1 / E] * E] * L, "specialization": [0.1] * L,
      "specialization_chance": [0.01] * L, "dominant_expert": {g: [0] * L for g in groups},
      "dominant_share": {g: [0.5] * L for g in groups}}}


def _png_shape(path):
  img = matplotlib.image.imread(path)
  assert img.ndim == 3 and img.std() > 0, f"{path}: blank image"
  return img.shape[:2]


def test_heatmap_pngs_have_the_expected_size(tmp_path):
  paths = plots.routing_heatmaps(_fake_result(), str(tmp_path), "family")
  names = sorted(os.path.relpath(p, tmp_path) for p in paths)
  assert names == ["dominant_family.png", "heatmap_average.png", "heatmaps/family_Afro-Asian.png",
                   "heatmaps/family_Indo-European.png", "heatmaps/family_Sino-Tibetan.png"]
  # 2 layers x 3 experts (and 2 layers x 3 families): (0.8+1.5+1.0+0.5) x (1.1+0.8+0.45) in at 100 dpi
  assert plots.heatmap_size(2, 3) == pytest.approx((3.8, 2.35))
  for p in paths:
    assert _png_shape(p) == (235, 380), p


@pytest.fixture(scope="module")
def language_routed():
  """A random-init tiny model with language routing in every layer (family7: 7 experts, top-1)."""
  from test_model import make_config
  from apollo_jax.model import transformer
  c = make_config("routing=language,moe_layers=all")
  c.data.seq_len = 32
  rng = np.random.default_rng(0)     # random weights without compiling init: routing ignores them
  params = jax.tree.map(lambda s: rng.normal(0, 0.1, s.shape).astype(np.float32),
                        transformer.abstract_params(c))
  tok = tok_lib.load_tokenizer(os.path.join(ROOT, "data/sample/tokenizer.model"))
  return inference.from_params(c, params, tok)      # on the 8 simulated devices (fsdp=8)


def test_language_routed_model_puts_each_language_on_its_expert(language_routed, tmp_path):
  codes = ("en", "zh", "ar", "ja", "sw", "vi")
  rng = np.random.default_rng(0)
  inputs = [(rng.integers(4, 128, n).astype(np.int32), languages.index(code))
            for code in codes for n in (5, 11, 16)]          # ragged: batches carry padding
  res = routing.analyze(language_routed, inputs, batch_size=4, max_len=32)
  assert res["moe_layers"] == [0, 1, 2] and res["tokens"] == 32 * len(codes)
  fam = languages.expert_map("family7")
  lang = res["language"]
  assert lang["groups"] == list(codes)
  for code in codes:
    assert lang["tokens"][code] == 32
    want = np.eye(7)[fam[languages.index(code)]]
    np.testing.assert_allclose(lang["fraction"][code], [want] * 3, err_msg=code)
  np.testing.assert_allclose(lang["specialization"], 1.0)
  np.testing.assert_allclose(res["family"]["specialization"], 1.0)
  paths = routing.write(res, str(tmp_path), "family")
  assert os.path.exists(tmp_path / "routing.json") and len(paths) == 1 + 6 + 2      # 6 families


def test_read_inputs_conversations_and_bench(language_routed):
  tok = language_routed.tokenizer
  conv = routing.read_inputs(os.path.join(ROOT, "data/sample/apollo_moe_sample.json"), tok, 64)
  bench = routing.read_inputs(os.path.join(ROOT, "data/sample/apollo_moe_bench_sample.json"), tok, 4096)
  assert len(conv) == 280 and max(len(ids) for ids, _ in conv) == 64
  assert {languages.CODES[l] for _, l in conv} == set(languages.CODES)
  assert len(bench) == 136 and {languages.CODES[l] for _, l in bench} == set(languages.CODES)
  assert routing.bench_language("headqa") == languages.index("es")
  assert routing.bench_language("MMLU_clinical_knowledge_de") == languages.index("de")
  with pytest.raises(ValueError, match="unknown language"):
    routing.bench_language("mystery-bench")


def test_cli_bad_model_path_is_a_clear_error(tmp_path):
  import subprocess
  import sys
  out = subprocess.run([sys.executable, "-m", "apollo_jax.analyze", f"--model={tmp_path / 'nope'}",
                        f"--out={tmp_path / 'out'}"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 1 and "Traceback" not in out.stderr
  assert "model path" in out.stderr and "does not exist" in out.stderr
