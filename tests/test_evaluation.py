"""Evaluation without a model: answer extraction, bench reading, prompts, aggregation, scoring
logic with fake language models, report files."""

import json
import math
import os
import re

import ml_collections
import numpy as np
import pytest

from apollo_jax import languages
from apollo_jax.data import tokenizer as tok_lib
from apollo_jax.evaluation import aggregate, bench, extract_answer, prompts, scoring
from apollo_jax.evaluation.runner import evaluate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(REPO, "data/sample/apollo_moe_bench_sample.json")
TOKENIZER = os.path.join(REPO, "data/sample/tokenizer.model")

# (response, expected letter) — the rules of apollo_jax/evaluation/extract.py, hand-written.
EXTRACT_TABLE = [
    ("The correct answer is (B).", "B"),
    ("(b)", "B"),                                        # lower case counts
    ("(e) then (f)", "E"),                               # tie -> first; E and F are in range
    ("(g)", None),                                       # G is out of range, no upper-case A-F
    ("（C）是正确答案。", "C"),                              # full-width parentheses
    ("（d)", "D"),                                       # mixed full-width / ASCII
    ("(A) or (B) or (b)", "B"),                          # most frequent
    ("(B) or (A)", "B"),                                 # tie -> first appearance
    ("(b) (a) (A) (B)", "B"),                            # tie 2-2 -> first counted
    ("(C) first line\n(D) (D) (D)", "C"),                # only the first line counts
    ("\n\n(D) after blank lines\n(A)", "D"),             # first NON-EMPTY line
    ("\n\n", None),
    # Arabic rule 1: an option letter adds at most one, however often it occurs.
    ("(أ) (أ) (B)", "B"),                                # A=1 (not 2) ties B=1; Latin inserted first
    ("(ب) (ب) (ب) (A) (A)", "A"),                        # B=1 < A=2
    ("(س) (ك)", "C"),                                    # both spell C: one count
    ("(س) (ك) (D)", "D"),                                # ... so C=1 ties D=1, D (Latin) first
    # Arabic rule 2: added after the Latin counts, in the order A, B, C, D.
    ("(أ) or (B)", "B"),                                 # tie: Latin matches come before Arabic
    ("(د) (ب)", "B"),                                    # tie: B inserted before D, whatever the text order
    ("د) ك) ب) أ)", "A"),                                # four-way tie -> A
    # Arabic rule 3: an opening parenthesis before, or a closing one after.
    ("الإجابة الصحيحة هي (ب", "B"),                      # opening before
    ("د) هي الإجابة", "D"),                              # closing after
    ("（ك", "C"),                                        # full-width opening
    ("س）", "C"),                                        # full-width closing
    ("(ك)", "C"),                                        # kaf -> C
    ("(س)", "C"),                                        # seen -> C
    (")د", None),                                        # closing before: nothing (no Latin either)
    ("د(", None),                                        # opening after: nothing
    (")د( D", "D"),                                      # wrong sides; the loose pass finds D
    ("(أ) أ أ", "A"),                                    # bare Arabic letters do not count
    ("ب", None),                                         # no parenthesis at all: nothing
    # The three responses where the old extractor disagreed with the original scorer.
    ("دA（\t(G)دE)c", "A"),                              # no Arabic match; loose pass: A before E
    ("أ)B.ك)Yes.ك)No.(د", "A"),                          # A=1, C=1 (once), D=1 -> A
    ("أ) ب) ب)", "A"),
    ("I choose D", "D"),                                 # loose fallback: any upper-case A-F
    ("Answer: C", "A"),                                  # loose: 'A' of "Answer" ties C, comes first
    ("answer: c", None),                                 # loose is upper-case only
    ("The answer is d, not E or E", "E"),                # loose counts: E twice
    ("Yes.", "A"),
    ("No.", "B"),
    ("Yes.\n(B)", "A"),                                  # the first line is exactly "Yes."
    ("Yes", None),                                       # exact strings only
    ("No. It is", None),
    (" No.", None),
    ("", None),
]


@pytest.mark.parametrize("response,expected", EXTRACT_TABLE)
def test_extract_answer(response, expected):
  assert extract_answer(response) == expected


def _original_scorer(response):
  """A second, independent transcription of the original scorer's control flow: a recursive
  strict-then-loose pass over the first non-empty line, Arabic options checked once each."""
  def choose(pattern, text):
    if "\n" in text:
      for part in text.split("\n"):
        if len(part):
          text = part
          break
    counts = {}
    for m in re.findall(pattern, text):
      counts[m.upper()] = counts.get(m.upper(), 0) + 1
    for option, arabic in (("A", "أ"), ("B", "ب"), ("C", "[سك]"), ("D", "د")):
      if re.findall(f"[（(]{arabic}[）)]?|[（(]?{arabic}[）)]", text):
        counts[option] = counts.get(option, 0) + 1
    if not counts:
      if pattern == r"[A-F]":
        return {"Yes.": "A", "No.": "B"}.get(text)
      return choose(r"[A-F]", text)
    top = max(counts.values())
    return [k for k, v in counts.items() if v == top][0]
  return choose(r"[（\(]([A-Fa-f])[）\)]", response)


def test_extract_answer_matches_the_original_on_random_tricky_responses():
  # Latin and Arabic letters, both kinds of parentheses, Yes./No., newlines: the mix where the
  # rules differ. 6,000 responses of 1-12 pieces.
  pieces = list("ABCDEFGabcdefg") + list("أبسكد") + list("()（）") + [
      "Yes.", "No.", "\n", " ", "\t", ".", "answer"]
  rng = np.random.default_rng(0)
  responses = ["".join(rng.choice(pieces, size=rng.integers(1, 13))) for _ in range(6000)]
  differ = [r for r in responses if extract_answer(r) != _original_scorer(r)]
  assert not differ, f"{len(differ)} differ, e.g. {differ[:5]!r}"


# ---------------------------------------------------------------- bench


def test_source_language():
  assert bench.source_language("headqa") == "es"
  assert bench.source_language("IgakuQA") == "ja"               # case-insensitive table
  assert bench.source_language("MMLU_college_biology_pt") == "pt"
  assert bench.source_language("mmlu-medical-fr") == "fr"
  assert bench.source_language("mmlu-medical-ckb") == "ckb"
  with pytest.raises(ValueError, match="unknown language"):
    bench.source_language("mystery-bench")


def test_sample_bench_has_all_languages():
  items, bad = bench.read(SAMPLE)
  assert len(items) == 136 and bad.count == 0
  assert {it.language for it in items} == set(languages.CODES)
  assert [it.id for it in items] == list(range(136))
  first = items[0]
  assert first.gold == "D" and first.labels == ("A", "B", "C", "D")
  assert first.texts[3] == "Iron deficiency anemia"


def _write(tmp_path, records, name="bench.json"):
  path = str(tmp_path / name)
  with open(path, "w") as f:
    json.dump(records, f)
  return path


GOOD = {"question": "q?", "options": "(A) x\n(B) y", "answer": "(B)", "source": "headqa"}


@pytest.mark.parametrize("bad,message", [
    ({"answer": "B"}, "not a letter in parentheses"),
    ({"answer": "(C)"}, "not one of the options"),
    ({"options": "(A) x\nno label"}, "does not start with a label"),
    ({"source": "nowhere"}, "unknown language"),
    ({"question": 3}, "must be a string"),
])
def test_bad_record_is_named_or_skipped(tmp_path, bad, message):
  path = _write(tmp_path, [GOOD, {**GOOD, **bad}])
  for cache in (None, str(tmp_path / "cache")):          # read directly, or built into TFDS
    with pytest.raises(ValueError, match=f"bench.json: record 1 .*{message}"):
      bench.read(path, cache_dir=cache)
    items, tally = bench.read(path, skip_bad=True, cache_dir=cache)
    assert len(items) == 1 and tally.count == 1
  items, tally = bench.read(path, skip_bad=True, cache_dir=str(tmp_path / "cache"))   # reused build
  assert len(items) == 1 and tally.count == 1


def test_bench_through_tfds_equals_direct_read(tmp_path, monkeypatch):
  cache = str(tmp_path / "cache")
  assert bench.read(SAMPLE, cache_dir=cache) == bench.read(SAMPLE)
  path = _write(tmp_path, [GOOD])
  assert [it.gold for it in bench.read(path, cache_dir=cache)[0]] == ["B"]
  _write(tmp_path, [GOOD, {**GOOD, "answer": "(A)"}])       # edited file: rebuilt, not reused
  assert [it.gold for it in bench.read(path, cache_dir=cache)[0]] == ["B", "A"]


def test_select():
  items, _ = bench.read(SAMPLE)
  sel = bench.select(items, ["en", "ckb"], limit=1)
  assert [(it.source, it.language) for it in sel] == [
      ("medqa-usmle", "en"), ("mmlu-medical", "en"), ("mmlu-medical-ckb", "ckb")]
  with pytest.raises(ValueError, match="unknown codes"):
    bench.select(items, ["xx"])


# ---------------------------------------------------------------- prompts


@pytest.fixture(scope="module")
def sample():
  return bench.read(SAMPLE)[0]


@pytest.fixture(scope="module")
def templates():
  return prompts.load_templates()


def test_prompts_shots_same_source_never_the_item(sample, templates):
  ps, skipped = prompts.build(sample, sample, templates, shots=3, seed=0)
  assert not skipped and len(ps) == len(sample)
  by_id = {it.id: it for it in sample}
  for p in ps:
    pool = sum(it.source == p.item.source for it in sample)
    assert len(p.shot_ids) == min(3, pool - 1)            # the sample's prompts are short
    assert p.item.id not in p.shot_ids
    assert len(set(p.shot_ids)) == len(p.shot_ids)
    assert all(by_id[i].source == p.item.source for i in p.shot_ids)
    assert p.text.endswith("\nAssistant:") and p.text.count("User:") == len(p.shot_ids) + 1
    assert p.text.count(prompts.EOS_TEXT) == len(p.shot_ids)
    for i in p.shot_ids:                                  # each shot shows its own answer
      t = prompts.template_for(templates, p.item.language)
      assert prompts.shot_text(t, by_id[i]) in p.text


def test_prompts_seeded(sample, templates):
  a, _ = prompts.build(sample, sample, templates, seed=1)
  b, _ = prompts.build(sample, sample, templates, seed=1)
  c, _ = prompts.build(sample, sample, templates, seed=2)
  assert [p.text for p in a] == [p.text for p in b]
  assert [p.shot_ids for p in a] != [p.shot_ids for p in c]
  heads = [p.shot_ids for p in a if p.item.source == "headqa"]
  assert len(set(heads)) > 1                                # each item draws its own shots
  # a prompt does not depend on which other items are evaluated
  subset, _ = prompts.build(sample[40:60], sample, templates, seed=1)
  assert [p.text for p in subset] == [p.text for p in a[40:60]]


def test_prompts_budget(sample, templates):
  """Shots are added while len(prompt) + len(query) + len(shot) < budget; longer prompts skipped."""
  items = [it for it in sample if it.source == "headqa"]
  t = prompts.template_for(templates, "es")
  queries = [len(prompts.query_text(t, it)) for it in items]
  shot = max(len(prompts.shot_text(t, it)) for it in items)
  budget = max(queries) + shot + 1
  ps, skipped = prompts.build(items, items, templates, shots=3, seed=0, budget=budget)
  assert not skipped
  by_id = {it.id: it for it in items}
  for p in ps:
    q = len(prompts.query_text(t, p.item))
    shots = prompts.draw_shots(p.item, items, 3, 0)
    n = 0
    while n < len(shots) and sum(len(prompts.shot_text(t, s)) for s in shots[:n + 1]) + q < budget:
      n += 1
    assert p.shot_ids == tuple(s.id for s in shots[:n])
    assert len(p.text) <= budget
    assert [by_id[i] for i in p.shot_ids] == shots[:n]
  # any one shot fits, not always all three
  assert all(len(p.shot_ids) >= 1 for p in ps) and any(len(p.shot_ids) < 3 for p in ps)
  # a budget below the query itself skips the item (and counts it)
  ps, skipped = prompts.build(items, items, templates, budget=min(queries) - 1)
  assert not ps and skipped == items


def test_templates_per_language(sample, templates):
  ps, _ = prompts.build(sample, sample, templates, shots=0)
  text = {p.item.language: p.text for p in ps}
  en = templates["en"]["instruction"]
  assert text["en"].startswith("User:" + en)
  assert text["ckb"].startswith("User:" + en)               # minor languages: English, A-D
  assert text["ru"].startswith("User:" + templates["ru"]["instruction"]) and "A или B" in text["ru"]
  assert "A到E" in text["zh"]
  assert prompts.answer_text(templates["ar"], "(B)").startswith("(B)")   # Arabic: phrase after the letter


def test_context_line(templates):
  it = bench.Item(0, "pubmedqa", "en", "Does X help?", "(A) yes\n(B) no\n(C) maybe", ("A", "B", "C"),
                  ("yes", "no", "maybe"), "(A)", "A", context="Some abstract.")
  assert "\nContext: Some abstract.\nQuestion: Does X help?\n" in prompts.query_text(templates["en"], it)


def test_custom_templates(tmp_path):
  path = _write(tmp_path, {"default": "en", "languages": {"en": {"instruction": "Pick.", "context": "{context}",
                           "question": "Q: {question}", "options": "{options}", "answer": "{answer}"}}})
  t = prompts.load_templates(path)
  assert t["default"]["instruction"] == "Pick." and prompts.template_for(t, "zh") is t["default"]
  bad = _write(tmp_path, {"default": "en", "languages": {"en": {"instruction": "x"}}}, "bad.json")
  with pytest.raises(ValueError, match="lacks the string field"):
    prompts.load_templates(bad)


# ---------------------------------------------------------------- aggregation


def _var(right, n):
  p = (right + 2) / (n + 4)
  return p * (1 - p) / (n + 4)


def _results(spec):
  out = []
  for source, lang, right, n in spec:
    out += [(source, lang, i < right) for i in range(n)]
  return out


SPEC = [("medqa-usmle", "en", 3, 4), ("medmcqa", "en", 1, 2), ("pubmedqa", "en", 2, 2),
        ("frenchmedmcqa", "fr", 1, 4), ("mmlu-medical-fr", "fr", 2, 2), ("RuMedDaNet", "ru", 1, 2),
        ("mmlu-medical-ckb", "ckb", 2, 2), ("mmlu-medical-mt", "mt", 0, 3)]


def test_aggregate_hand_computed():
  z = 1.959963984540054
  r = aggregate.aggregate(_results(SPEC))
  assert r["per_source"]["pubmedqa"]["excluded"] and r["per_source"]["pubmedqa"]["acc"] == 1.0
  lang = r["per_language"]
  assert lang["en"]["acc"] == pytest.approx((0.75 + 0.5) / 2)     # macro, pubmedqa excluded
  assert lang["en"]["sources"] == ["medmcqa", "medqa-usmle"]
  assert lang["fr"]["acc"] == pytest.approx(3 / 6)                 # micro (macro would be 0.625)
  assert lang["ru"]["acc"] == 0.5 and lang["ckb"]["acc"] == 1.0 and lang["mt"]["acc"] == 0.0
  assert r["major_avg"]["acc"] == pytest.approx((0.625 + 0.5 + 0.5) / 3)
  assert r["major_avg"]["languages"] == 3 and r["major_avg"]["of"] == 12
  assert r["minor_avg"]["acc"] == pytest.approx(0.5) and r["minor_avg"]["languages"] == 2
  # intervals: Agresti-Coull variances, weighted like the averages
  assert r["per_source"]["mmlu-medical-ckb"]["ci"] == pytest.approx([1 - z * math.sqrt(_var(2, 2)), 1.0])
  assert r["per_source"]["mmlu-medical-mt"]["ci"] == pytest.approx([0.0, z * math.sqrt(_var(0, 3))])
  v_en = (_var(3, 4) + _var(1, 2)) / 4
  v_fr = (4 / 6) ** 2 * _var(1, 4) + (2 / 6) ** 2 * _var(2, 2)
  v_ru = _var(1, 2)
  assert lang["en"]["ci"] == pytest.approx([0.625 - z * math.sqrt(v_en), 0.625 + z * math.sqrt(v_en)])
  assert lang["fr"]["ci"] == pytest.approx([0.5 - z * math.sqrt(v_fr), 0.5 + z * math.sqrt(v_fr)])
  half = z * math.sqrt((v_en + v_fr + v_ru) / 9)
  assert r["major_avg"]["ci"] == pytest.approx([r["major_avg"]["acc"] - half, r["major_avg"]["acc"] + half])


def test_aggregate_without_exclusions():
  r = aggregate.aggregate(_results(SPEC), exclude=())
  assert r["per_language"]["en"]["acc"] == pytest.approx((0.75 + 0.5 + 1.0) / 3)
  r = aggregate.aggregate(_results(SPEC[3:5]))
  assert r["minor_avg"]["acc"] is None and r["minor_avg"]["languages"] == 0


# ---------------------------------------------------------------- scoring with fake models


class FakeLM:
  """The inference.LM interface on token ids; prefers option `planted` in both modes; logs calls."""

  def __init__(self, planted="C", response=None):
    self.tokenizer = tok_lib.load_tokenizer(TOKENIZER)
    self.planted, self.response = planted, response
    self.calls = []

  def decode(self, ids):
    return self.tokenizer.decode([t for t in ids if t != self.tokenizer.eos_id])

  def score(self, prompt_ids, continuation_ids, batch_size=8):
    self.calls.append(("score", len(prompt_ids), batch_size))
    assert all(self.decode(p).endswith("Assistant:") for p in prompt_ids)
    conts = [self.decode(c) for c in continuation_ids]
    return np.array([0.0 if f"({self.planted})" in c else -50.0 - len(c) for c in conts])

  def generate(self, prompt_ids, max_new_tokens=256, temperature=0.0, batch_size=16, min_new_tokens=0):
    self.calls.append(("generate", len(prompt_ids), max_new_tokens, temperature, min_new_tokens))
    text = self.response or f"The correct answer is ({self.planted})."
    return [self.tokenizer.encode(text) + [self.tokenizer.eos_id] for _ in prompt_ids]


def test_loglik_picks_planted_answer(sample, templates):
  items = [it for it in sample if "C" in it.labels]
  ps, _ = prompts.build(items, sample, templates)
  lm = FakeLM("C")
  out = scoring.loglik(lm, ps, templates, batch_size=7, progress=False)
  assert all(o["loglik_pred"] == "C" and o["loglik_norm_pred"] == "C" for o in out)
  assert sum(n for _, n, _ in lm.calls) == sum(len(p.item.labels) for p in ps)   # one pair per option
  assert max(n for _, n, _ in lm.calls) == 7 and all(n == b for _, n, b in lm.calls)
  # every option's continuation is its answer sentence, scored in option order
  o, p = out[0], ps[0]
  conts = prompts.continuations(templates, p.item)
  assert list(o["loglik"]) == list(p.item.labels)
  assert o["loglik"]["A"] == -50.0 - len(lm.decode(lm.tokenizer.encode(conts[0])))
  assert o["loglik_tokens"]["A"] == len(lm.tokenizer.encode(conts[0]))


def test_length_normalised_differs_from_sum(templates):
  long = "una respuesta mucho mas larga que la otra, que sigue y sigue sin parar"
  it = bench.Item(0, "headqa", "es", "q", f"(A) si\n(B) {long}", ("A", "B"), ("si", long), "(B)", "B")

  class LM(FakeLM):
    def score(self, prompt_ids, continuation_ids, batch_size=8):   # option A: -2 per token, B: -1
      return np.array([-(2.0 if "(A)" in self.decode(c) else 1.0) * len(c) for c in continuation_ids])
  lm = LM()
  ps, _ = prompts.build([it], [it], templates)
  n = [len(lm.tokenizer.encode(c)) for c in prompts.continuations(templates, it)]
  assert n[1] > 2 * n[0]                                    # B is so long that the sum prefers A
  (o,) = scoring.loglik(lm, ps, templates, progress=False)
  assert o["loglik"] == {"A": -2.0 * n[0], "B": -1.0 * n[1]}
  assert o["loglik_pred"] == "A" and o["loglik_norm_pred"] == "B"


def test_generate_greedy_and_extracted(sample, templates):
  ps, _ = prompts.build(sample[:10], sample, templates)
  lm = FakeLM(response="\n(b) because ...")
  out = scoring.generate(lm, ps, max_new_tokens=17, batch_size=4, progress=False)
  assert [c[1] for c in lm.calls] == [4, 4, 2]              # full batches: few compiled shapes
  assert all(c[0] == "generate" and c[2:] == (17, 0.0, 2) for c in lm.calls)   # min_new_tokens 2 (original)
  assert all(o == {"response": "\n(b) because ...", "extracted": "B"} for o in out)


def test_language_routed_model_gets_one_language_per_batch(sample, templates):
  class LM(FakeLM):
    config = ml_collections.ConfigDict({"moe": {"routing": "language"}})

    def score(self, prompt_ids, continuation_ids, batch_size=8, language=None):
      self.calls.append((language, [self.decode(p) for p in prompt_ids]))
      return np.zeros(len(prompt_ids))
  ps, _ = prompts.build(sample[:20], sample, templates)
  lm = LM()
  scoring.loglik(lm, ps, templates, batch_size=8, progress=False)
  langs = [p.item.language for p in ps]
  assert sorted(c[0] for c in lm.calls) == sorted(c for c in set(langs) for _ in range(
      -(-sum(len(p.item.labels) for p in ps if p.item.language == c) // 8)))
  text_lang = {lm.decode(prompts.encode(lm.tokenizer, p.text)): p.item.language
               for p in ps}
  assert all(text_lang[t] == language for language, texts in lm.calls for t in texts)


def test_evaluate_writes_outputs(tmp_path):
  lm = FakeLM("B")
  preds, scores = evaluate(lm, SAMPLE, str(tmp_path), mode="both", languages=["en", "ru", "ckb", "zh"],
                           model_name="fake", progress=False)
  names = sorted(os.listdir(tmp_path))
  assert names == ["per_language.png", "predictions.jsonl", "report.md", "scores.json"]
  with open(tmp_path / "predictions.jsonl") as f:
    lines = [json.loads(x) for x in f]
  assert len(lines) == len(preds) == 5 + 5 + 5 + 2
  for rec in lines:
    assert {"source", "language", "response", "extracted", "gold", "correct", "loglik"} <= set(rec)
    assert rec["correct"] == {m: rec["gold"] == "B" for m in ("generate", "loglik", "loglik_norm")}
  with open(tmp_path / "scores.json") as f:
    s = json.load(f)
  assert s["mode"] == "both" and s["model"] == "fake" and s["primary"] == "generate"
  assert set(s["methods"]) == {"generate", "loglik", "loglik_norm"}
  assert s["counts"]["scored"] == 17 and s["counts"]["bench"] == 136
  want = aggregate.aggregate([(p["source"], p["language"], p["gold"] == "B") for p in preds])
  assert s["per_language"] == json.loads(json.dumps(want["per_language"]))
  assert set(s["per_language"]) == {"en", "ru", "ckb", "zh"}
  md = (tmp_path / "report.md").read_text()
  assert "| model | #params | Major | Minor | Ar | De | En |" in md
  en = 100 * s["per_language"]["en"]["acc"]
  assert f"| this model, generate | ? | {100 * s['major_avg']['acc']:.1f} | " in md and f"{en:.1f}" in md


def test_evaluate_loglik_mode_only(tmp_path):
  lm = FakeLM("A")
  preds, scores = evaluate(lm, SAMPLE, None, mode="loglik", limit=1, progress=False)
  assert {c[0] for c in lm.calls} == {"score"}
  assert set(scores["methods"]) == {"loglik", "loglik_norm"} and scores["primary"] == "loglik"
  assert len(preds) == len({it.source for it in bench.read(SAMPLE)[0]})   # one per source
  assert "response" not in preds[0]
  with pytest.raises(ValueError, match="--mode"):
    evaluate(lm, SAMPLE, None, mode="sample")
