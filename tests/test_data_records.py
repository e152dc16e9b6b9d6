"""Readers: both ApolloMoEDataset forms, ApolloMoEBench, file specs, and every bad-record kind."""

import copy
import logging
import os

import pytest
import tensorflow_datasets as tfds

import data_fixtures as F
from apollo_jax import languages
from apollo_jax.data import records, tfds_builders

GOOD = F.to_list_form(F.make_conversations(0))[:4]


def test_both_forms_same_samples(tmp_path):
  convs = F.make_conversations(1)
  a, _ = records.read_dataset(F.write_json(tmp_path / "l.json", F.to_list_form(convs)))
  b, _ = records.read_dataset(F.write_json(tmp_path / "e.json", convs))
  assert len(a) == sum(len(v) for v in convs.values())
  assert [(s.source, s.language, s.turns) for s in a] == [(s.source, s.language, s.turns) for s in b]
  assert a[0].language == languages.CODES.index("en") and a[0].source == "medicalBook_en_qa"
  ckb = [s for s in a if s.source == "general_ckb"][0]
  assert languages.CODES[ckb.language] == "ckb"


def test_file_specs(tmp_path):
  p1 = F.write_json(tmp_path / "a1.json", GOOD[:2])
  p2 = F.write_json(tmp_path / "a2.json", GOOD[2:])
  assert records.expand_files(str(tmp_path / "a*.json")) == [p1, p2]
  assert records.expand_files(f"{p2}, {p1}") == [p2, p1]
  samples, _ = records.read_dataset(f"{tmp_path}/a*.json")
  assert len(samples) == 4
  with pytest.raises(FileNotFoundError, match="nope"):
    records.expand_files(str(tmp_path / "nope*.json"))


def _bad_list(kind):
  items = copy.deepcopy(GOOD)
  bad = items[2]
  if kind == "missing_conversations":
    del bad["conversations"]
  elif kind == "missing_source":
    del bad["source"]
  elif kind == "unknown_language":
    bad["source"] = "general_xx"
  elif kind == "empty":
    bad["conversations"] = []
  elif kind == "value_not_string":
    bad["conversations"][1]["value"] = 5
  elif kind == "conversations_not_list":
    bad["conversations"] = "User: hi"
  elif kind == "turn_not_object":
    bad["conversations"][0] = "hi"
  elif kind == "record_not_object":
    items[2] = ["hi", "there"]
  return items


LIST_KINDS = ["missing_conversations", "missing_source", "unknown_language", "empty",
              "value_not_string", "conversations_not_list", "turn_not_object", "record_not_object"]
MESSAGES = {"missing_conversations": "missing field 'conversations'", "missing_source": "missing field 'source'",
            "unknown_language": "unknown language code 'xx'", "empty": "empty conversation",
            "value_not_string": "must be a string",
            "conversations_not_list": "'conversations' must be a list", "turn_not_object": "turn 0",
            "record_not_object": "expected an object"}


@pytest.mark.parametrize("kind", LIST_KINDS)
def test_bad_list_record(tmp_path, kind, caplog):
  path = F.write_json(tmp_path / f"bad_{kind}.json", _bad_list(kind))
  with pytest.raises(ValueError) as e:
    records.read_dataset(path)
  msg = str(e.value)
  assert path in msg and "record 2" in msg and MESSAGES[kind] in msg, msg
  if kind not in ("missing_source", "record_not_object"):
    assert "source '" in msg              # the record's source key is named too
  with caplog.at_level(logging.WARNING):
    samples, bad = records.read_dataset(path, skip_bad=True)
  assert bad.count == 1 and len(samples) == 3 and MESSAGES[kind] in bad.reasons[0]
  assert "skipped 1 bad records" in caplog.text


EXT_KINDS = {"item_not_list": ("medicalBook_en_qa", 1, "q"), "value_not_string": ("medicalBook_en_qa", 1, ["q", 3]),
             "empty": ("general_en", 0, [])}


@pytest.mark.parametrize("kind", sorted(EXT_KINDS))
def test_bad_extracted_record(tmp_path, kind):
  convs = F.make_conversations(0)
  source, i, value = EXT_KINDS[kind]
  convs[source][i] = value
  path = F.write_json(tmp_path / "ext.json", convs)
  with pytest.raises(ValueError, match=f"record {i} \\(source '{source}'\\)") as e:
    records.read_dataset(path)
  assert path in str(e.value)
  samples, bad = records.read_dataset(path, skip_bad=True)
  assert bad.count == 1 and len(samples) == sum(len(v) for v in convs.values()) - 1


def test_extracted_unknown_language_and_non_list(tmp_path):
  path = F.write_json(tmp_path / "ext.json", {"general_en": [["q", "a"]], "general_qq": [["q", "a"], ["b", "c"]],
                                               "math_en": "oops"})
  with pytest.raises(ValueError, match="unknown language code 'qq'"):
    records.read_dataset(path)
  samples, bad = records.read_dataset(path, skip_bad=True)
  assert len(samples) == 1 and bad.count == 3        # two unknown-language records + the non-list value


def test_malformed_json_names_file_line_column(tmp_path):
  path = tmp_path / "broken.json"
  path.write_text('[\n {"conversations": [{"value": "q"}], "source": "general_en"},\n {"source": oops}\n]')
  for skip in (False, True):                 # a file that does not parse is never skipped silently
    with pytest.raises(ValueError, match=r"broken.json: malformed JSON at line 3 column 13"):
      records.read_dataset(str(path), skip_bad=skip)
  (tmp_path / "scalar.json").write_text("42")
  with pytest.raises(ValueError, match="scalar.json: expected a JSON list"):
    records.read_dataset(str(tmp_path / "scalar.json"))


def test_bench_reader_and_builder(tmp_path):
  items = [{"question": "Q1?", "options": "(A) x\n(B) y", "answer": "(B)", "source": "medqa", "context": ""},
           {"question": "Q2?", "options": "(A) x\n(B) y", "answer": "(A)", "source": "mmlu-medical-ar"},
           {"question": 7, "options": "(A) x", "answer": "(A)", "source": "medqa"},
           {"options": "(A) x", "answer": "(A)", "source": "medqa"}]
  path = F.write_json(tmp_path / "bench.json", items)
  with pytest.raises(ValueError, match=r"bench.json: record 2 \(source 'medqa'\): field 'question' must be a string"):
    records.read_bench(path)
  recs, bad = records.read_bench(path, skip_bad=True)
  assert bad.count == 2 and [r["question"] for r in recs] == ["Q1?", "Q2?"]
  cache = str(tmp_path / "cache")
  directory, built = tfds_builders.build_bench(path, cache, skip_bad=True)
  assert built and tfds_builders.read_meta(directory)["bad_records_skipped"] == 2
  # what a user loads by name with TFDS itself
  name = "apollo_moe_bench/" + os.path.basename(os.path.dirname(directory))
  src = tfds.data_source(name, data_dir=os.path.join(cache, "tfds"))["train"]
  got = sorted((int(x["index"]), {k: x[k].decode() for k in recs[0]}) for x in src)
  assert [g[1] for g in got] == recs
  loaded, bad = tfds_builders.load_bench(path, cache, skip_bad=True)
  assert loaded == recs and bad.count == 2
  assert tfds_builders.build_bench(path, cache, skip_bad=True)[1] is False      # built once
