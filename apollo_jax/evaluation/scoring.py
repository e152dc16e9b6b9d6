"""Scoring prompts with a language model: greedy generation + answer extraction, and option
log-likelihoods. `lm` is anything with the `apollo_jax.inference` interface:
  lm.generate(prompts, max_new_tokens=..., temperature=0.0) -> generated strings
  lm.score(prompts, continuations) -> summed log-probabilities (numpy)
  lm.tokenizer.encode(text) -> ids
Calls are made in batches of similar-length prompts (less padding) behind a progress bar. An lm
whose score/generate take a `languages` argument also gets each prompt's language code (models
with language-specific routing need it).
"""

import inspect

import numpy as np
from tqdm import tqdm

from apollo_jax.evaluation import prompts as prompts_lib
from apollo_jax.evaluation.extract import extract_answer

METHODS = {"generate": ("generate",), "loglik": ("loglik", "loglik_norm"),
           "both": ("generate", "loglik", "loglik_norm")}


def _languages(fn, prompts, idx):
  if "languages" in inspect.signature(fn).parameters:
    return {"languages": [prompts[i].item.language for i in idx]}
  return {}


def _batches(keys, batch_size):
  """Index batches, longest first (so the slowest batch shows up early in the bar)."""
  order = sorted(range(len(keys)), key=lambda i: -keys[i])
  return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def generate(lm, prompts, max_new_tokens=256, batch_size=8, progress=True, desc="generate"):
  """Per prompt: {'response', 'extracted'} from greedy decoding (only generated tokens)."""
  out = [None] * len(prompts)
  with tqdm(total=len(prompts), desc=desc, disable=not progress, dynamic_ncols=True) as bar:
    for idx in _batches([len(p.text) for p in prompts], batch_size):
      texts = lm.generate([prompts[i].text for i in idx], max_new_tokens=max_new_tokens, temperature=0.0,
                          **_languages(lm.generate, prompts, idx))
      for i, response in zip(idx, texts):
        out[i] = {"response": response, "extracted": extract_answer(response)}
      bar.update(len(idx))
  return out


def loglik(lm, prompts, templates, batch_size=16, progress=True, desc="loglik"):
  """Per prompt: each option's summed log-probability of its answer continuation, its token
  count, and the argmax letters by sum ('loglik_pred') and by per-token mean ('loglik_norm_pred')."""
  pairs = [(p, label, cont) for p in prompts
           for label, cont in zip(p.item.labels, prompts_lib.continuations(templates, p.item))]
  scores = np.zeros(len(pairs))
  with tqdm(total=len(prompts), desc=desc, disable=not progress, dynamic_ncols=True) as bar:
    done = 0.0
    for idx in _batches([len(p.text) + len(c) for p, _, c in pairs], batch_size):
      firsts = [pairs[i][0] for i in idx]
      scores[idx] = np.asarray(lm.score([p.text for p in firsts], [pairs[i][2] for i in idx],
                                        **_languages(lm.score, firsts, range(len(idx)))))
      done += sum(1 / len(pairs[i][0].item.labels) for i in idx)
      bar.update(round(done) - bar.n)
  out, k = [], 0
  for p in prompts:
    n = len(p.item.labels)
    ll = scores[k:k + n]
    tokens = np.array([max(1, len(lm.tokenizer.encode(c))) for _, _, c in pairs[k:k + n]])
    k += n
    out.append({"loglik": dict(zip(p.item.labels, ll.tolist())),
                "loglik_tokens": dict(zip(p.item.labels, tokens.tolist())),
                "loglik_pred": p.item.labels[int(np.argmax(ll))],
                "loglik_norm_pred": p.item.labels[int(np.argmax(ll / tokens))]})
  return out


def predictions(lm, prompts, templates, mode="both", max_new_tokens=256, batch_size=16, progress=True):
  """One record per prompt: item fields, the methods' outputs and `correct` per method."""
  if mode not in METHODS:
    raise ValueError(f"--mode={mode!r}; choose one of {', '.join(METHODS)}")
  gen = generate(lm, prompts, max_new_tokens, batch_size, progress) if "generate" in METHODS[mode] else None
  ll = loglik(lm, prompts, templates, batch_size, progress) if "loglik" in METHODS[mode] else None
  out = []
  for i, p in enumerate(prompts):
    it = p.item
    rec = {"id": it.id, "source": it.source, "language": it.language, "gold": it.gold,
           "shots": len(p.shot_ids), "prompt_chars": len(p.text)}
    correct = {}
    if gen is not None:
      rec.update(gen[i])
      correct["generate"] = gen[i]["extracted"] == it.gold
    if ll is not None:
      rec.update(ll[i])
      correct["loglik"] = ll[i]["loglik_pred"] == it.gold
      correct["loglik_norm"] = ll[i]["loglik_norm_pred"] == it.gold
    rec["correct"] = correct
    out.append(rec)
  return out
