"""Routing analysis behind `python -m apollo_jax.analyze` (apollo_jax/analyze.py): read
conversations or benchmark prompts, run inference-mode forward passes that sow each real token's
chosen experts, count them (analysis/routing_stats.py) and write routing.json and the heatmaps
(analysis/plots.py).
"""

import copy
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from apollo_jax import config as cfg
from apollo_jax import languages
from apollo_jax.analysis import plots, routing_stats
from apollo_jax.data import chat, records, stream_json, tfds_builders
from apollo_jax.evaluation import bench
from apollo_jax.inference import decoding
from apollo_jax.model import transformer
from apollo_jax.runtime import sharding


# Major-language benchmark ids are listed in evaluation/bench.py; other sources end in "-<code>" / "_<code>".
def bench_language(source: str) -> int:
  """Language index of an ApolloMoEBench source id ('headqa' -> es, 'mmlu-medical-ar' -> ar)."""
  return languages.index(bench.source_language(source))


def _is_bench(path: str) -> bool:
  """A benchmark file (a list of records with 'question'), judged by its first item (streamed)."""
  for _, _, item, _ in stream_json.iter_items(path, "{path}: not a JSON list or object ({got})"):
    return isinstance(item, dict) and "question" in item
  return False


def read_inputs(files: str, tokenizer, max_len: int, max_samples: int = 0, cache_dir=None) -> list:
  """[(ids int32[n <= max_len], language index)] from conversation or benchmark files; with
  `cache_dir`, benchmark files are read through their TFDS dataset there (data/tfds_builders.py)."""
  out = []
  encode = chat.ChatEncoder(tokenizer)
  for path in records.expand_files(files):
    if _is_bench(path):
      bench_records = (tfds_builders.load_bench([path], cache_dir) if cache_dir else records.read_bench([path]))[0]
      for r in bench_records:
        context = f"Context: {r['context']}\n" if r["context"] else ""
        ids = tokenizer.encode(f"{chat.USER}{context}{r['question']}\n{r['options']}")
        ids += tokenizer.encode(chat.SEP + chat.ASSISTANT)
        out.append((np.asarray(ids, np.int32), bench_language(r["source"])))
    else:
      out.extend((encode(s.turns)[0], s.language) for s in records.read_dataset([path])[0])
  if max_samples:
    out = out[:max_samples]
  if not out:
    raise ValueError(f"--data={files}: no conversations or benchmark records found")
  return [(ids[:max_len], lang) for ids, lang in out]


def routing_fn(lm):
  """jitted (params, ids, language_ids, segment_ids) -> {decoder layer: chosen experts [B,S,K]}."""
  config = copy.deepcopy(lm.config)
  with config.unlocked():
    config.moe.analysis = True
  module = transformer.build_model(config, lm.mesh)

  @jax.jit
  def fn(params, ids, language_ids, segment_ids):
    _, state = module.apply({"params": params}, ids, language_ids=language_ids,
                            segment_ids=segment_ids, train=False, mutable=["moe"])
    return {transformer._layer_index(name): s["chosen_experts"][0] for name, s in state["moe"].items()}
  return fn


def count(lm, inputs, batch_size: int = 8, max_len: int = 256) -> routing_stats.RoutingCounts:
  """Per-language RoutingCounts of `inputs` ([(ids, language)]) under `lm` (an inference.LM)."""
  c = lm.config
  layers = cfg.moe_layer_indices(c.moe.layers, c.model.num_layers)
  if not layers:
    raise ValueError("the model has no MoE layers (moe.layers='none'): there is no routing to analyse")
  fn = routing_fn(lm)
  counts = routing_stats.RoutingCounts(layers, len(languages.CODES), c.moe.num_experts)
  rows = decoding.round_up(batch_size, lm.batch_multiple)             # divisible over the mesh
  order = sorted(range(len(inputs)), key=lambda i: len(inputs[i][0]))   # similar lengths together
  for start in range(0, len(order), rows):
    chunk = [inputs[i] for i in order[start:start + rows]]
    P = min(decoding.bucket(max(len(ids) for ids, _ in chunk), 64), max_len)   # few compiles
    ids, lang, seg = (np.zeros((rows, P), np.int32) for _ in range(3))
    for r, (x, l) in enumerate(chunk):
      ids[r, :len(x)], lang[r, :len(x)], seg[r, :len(x)] = x, l, 1
    with sharding.activate(lm.mesh):
      chosen = jax.device_get(fn(lm.params, jnp.asarray(ids), jnp.asarray(lang), jnp.asarray(seg)))
    counts.add(chosen, lang, seg)
  return counts


def analyze(lm, inputs, batch_size: int = 8, max_len: int = 256) -> dict:
  """The routing.json object: per-language and per-family summaries of the model's routing."""
  by_lang = count(lm, inputs, batch_size, max_len)
  by_family = routing_stats.regroup(by_lang, languages.expert_map("family7"), len(languages.FAMILIES))
  e = lm.config.moe
  return {
      "moe_layers": by_lang.layers, "num_experts": e.num_experts, "top_k": e.top_k,
      "routing": e.routing, "expert_map": e.expert_map, "impl": e.get("impl", "capacity"),
      "sequences": len(inputs), "tokens": int(by_lang.tokens[0].sum()),
      "definitions": routing_stats.DEFINITIONS,
      "language": routing_stats.summarize(by_lang, "language"),
      "family": routing_stats.summarize(by_family, "family"),
  }


def write(result: dict, out_dir: str, group: str = "language") -> list:
  """routing.json + the heatmaps of `group` under out_dir; returns the written paths."""
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, "routing.json")
  with open(path, "w") as f:
    json.dump(result, f, indent=1)
  return [path] + plots.routing_heatmaps(result, out_dir, group)
