"""Few-shot prompts as the original built them (docs/original.md, Evaluation), with a seed.

A prompt is a chat in the training format (data/chat.py): each shot is one finished turn,
  User:<instruction>\\n[<context line>\\n]<question line>\\n<options lines>\\nAssistant:<answer><eos>\\n
and the item itself is the last user turn, ending in "Assistant:". The end-of-text marker is the
literal "<|endoftext|>" (as the original's text); `encode` turns it into the EOS id.

Shots: `shots + 1` items drawn from the item's own source (a per-item RNG seeded by seed, source
and item id, so a prompt never depends on which other items are evaluated); the item itself is
dropped if drawn, else the last draw. Shots are added in order while
`len(prompt) + len(query) + len(shot) < budget` characters; an item whose final prompt is longer
than `budget` characters is skipped (and counted), as in the original.
"""

import dataclasses
import json
import os
import random

from apollo_jax import languages

DEFAULT_TEMPLATES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates.json")
EOS_TEXT = "<|endoftext|>"
BUDGET_CHARS = 4096
FIELDS = ("instruction", "context", "question", "options", "answer")


@dataclasses.dataclass(frozen=True)
class Prompt:
  item: object             # bench.Item
  text: str                # shots + query, ends in "Assistant:"
  shot_ids: tuple          # ids of the items used as shots, in order


def load_templates(path: str = "") -> dict:
  """{language code or 'default': template dict} from a templates JSON (see templates.json)."""
  path = path or DEFAULT_TEMPLATES
  if not os.path.exists(path):
    raise FileNotFoundError(f"--templates={path}: file not found")
  with open(path, encoding="utf-8") as f:
    spec = json.load(f)
  table = spec.get("languages")
  if not isinstance(table, dict) or spec.get("default") not in table:
    raise ValueError(f"{path}: expected {{'default': <code>, 'languages': {{<code>: {{...}}}}}} with the "
                     "default code among the languages")
  for code, t in table.items():
    if code not in languages.CODES:
      raise ValueError(f"{path}: unknown language code {code!r}")
    missing = [k for k in FIELDS if not isinstance(t.get(k), str)]
    if missing:
      raise ValueError(f"{path}: language {code!r} lacks the string field(s) {missing}")
    for key in FIELDS[1:]:
      if "{" + key + "}" not in t[key]:
        raise ValueError(f"{path}: language {code!r} field {key!r} must contain '{{{key}}}'")
  return {**table, "default": table[spec["default"]]}


def template_for(templates: dict, language: str) -> dict:
  """Major languages use their own wording; minor ones the default (English A-D, as the original)."""
  if language in languages.MAJOR and language in templates:
    return templates[language]
  return templates["default"]


def answer_text(t: dict, answer: str) -> str:
  return t["answer"].format(answer=answer)


def query_text(t: dict, item) -> str:
  lines = [t["instruction"]]
  if item.context:
    lines.append(t["context"].format(context=item.context))
  lines += [t["question"].format(question=item.question), t["options"].format(options=item.options)]
  return "User:" + "\n".join(lines) + "\nAssistant:"


def shot_text(t: dict, item) -> str:
  return query_text(t, item) + answer_text(t, item.answer) + EOS_TEXT + "\n"


def draw_shots(item, pool, shots: int, seed: int):
  """`shots` items of `pool` (the item's source), never the item itself; deterministic."""
  rng = random.Random(f"{seed}/{item.source}/{item.id}")
  drawn = rng.sample(pool, min(shots + 1, len(pool)))
  if item in drawn:
    drawn.remove(item)
  else:
    drawn = drawn[:shots]
  return drawn


def build(items, pool, templates: dict, shots: int = 3, seed: int = 0, budget: int = BUDGET_CHARS):
  """(prompts, skipped items): prompts for `items`, shots from `pool` (usually the whole bench)."""
  by_source = {}
  for it in pool:
    by_source.setdefault(it.source, []).append(it)
  prompts, skipped = [], []
  for item in items:
    t = template_for(templates, item.language)
    query = query_text(t, item)
    text, used = "", []
    for shot in draw_shots(item, by_source.get(item.source, [item]), shots, seed):
      s = shot_text(t, shot)
      if len(text) + len(query) + len(s) >= budget:
        break
      text += s
      used.append(shot.id)
    text += query
    if len(text) > budget:
      skipped.append(item)
    else:
      prompts.append(Prompt(item, text, tuple(used)))
  return prompts, skipped


def encode(tokenizer, text: str) -> list:
  """Prompt ids with every literal end-of-text marker as the tokenizer's EOS id (what a Qwen2
  tokenizer does by itself; a sentencepiece model would spell the marker out)."""
  ids = []
  for j, part in enumerate(text.split(EOS_TEXT)):
    if j:
      ids.append(tokenizer.eos_id)
    ids += tokenizer.encode(part)
  return ids


def continuations(templates: dict, item):
  """One continuation per option for log-likelihood scoring: the answer sentence with the
  option's label and text, e.g. 'The correct answer is (B) Vitamin B12 deficiency.'"""
  t = template_for(templates, item.language)
  return [answer_text(t, f"({label}) {text}".rstrip()) for label, text in zip(item.labels, item.texts)]
