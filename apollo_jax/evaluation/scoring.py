"""Scoring prompts with a language model: greedy generation + answer extraction, and option
log-likelihoods. `lm` has the `apollo_jax.inference.LM` interface, used with token ids:
  lm.generate(prompt_ids, max_new_tokens=..., temperature=0.0, batch_size=...) -> generated ids
  lm.score(prompt_ids, continuation_ids, batch_size=...) -> summed log-probabilities (numpy)
  lm.decode(ids) -> text without EOS;  lm.tokenizer.encode(text) -> ids
Prompts are tokenised here (prompts.encode: the shots' end-of-text marker becomes the EOS id
with any tokenizer) and each continuation on its own. Calls go in full batches of similar
lengths (little padding, few compiled shapes), behind a progress bar; for a language-routed
model each batch holds one language, passed as `language=`.
"""

import numpy as np
from tqdm import tqdm

from apollo_jax.evaluation import prompts as prompts_lib
from apollo_jax.evaluation.extract import extract_answer

METHODS = {"generate": ("generate",), "loglik": ("loglik", "loglik_norm"),
           "both": ("generate", "loglik", "loglik_norm")}


def _needs_language(lm) -> bool:
  config = getattr(lm, "config", None)
  return config is not None and config.moe.routing == "language"


def _batches(lm, langs, lengths, batch_size):
  """Index batches, longest first: full batches (few compiled shapes), of one language each only
  for a model that routes by language."""
  group = langs if _needs_language(lm) else [""] * len(langs)
  order = sorted(range(len(lengths)), key=lambda i: (group[i], -lengths[i]))
  out = []
  for i in order:
    if out and len(out[-1]) < batch_size and group[out[-1][0]] == group[i]:
      out[-1].append(i)
    else:
      out.append([i])
  return out


def _language_kw(lm, language):
  """Only models that route by language need (and get) the language code."""
  return {"language": language} if _needs_language(lm) else {}


def generate(lm, prompts, max_new_tokens=256, batch_size=8, progress=True, desc="generate"):
  """Per prompt: {'response', 'extracted'} from greedy decoding (only generated tokens)."""
  ids = [prompts_lib.encode(lm.tokenizer, p.text) for p in prompts]
  langs = [p.item.language for p in prompts]
  out = [None] * len(prompts)
  with tqdm(total=len(prompts), desc=desc, disable=not progress, dynamic_ncols=True) as bar:
    for idx in _batches(lm, langs, [len(x) for x in ids], batch_size):
      gen = lm.generate([ids[i] for i in idx], max_new_tokens=max_new_tokens, temperature=0.0,
                        min_new_tokens=2, batch_size=len(idx),     # as the original
                        **_language_kw(lm, langs[idx[0]]))
      for i, g in zip(idx, gen):
        response = lm.decode(g)
        out[i] = {"response": response, "extracted": extract_answer(response)}
      bar.update(len(idx))
  return out


def loglik(lm, prompts, templates, batch_size=16, progress=True, desc="loglik"):
  """Per prompt: each option's summed log-probability of its answer continuation, its token
  count, and the argmax letters by sum ('loglik_pred') and by per-token mean ('loglik_norm_pred')."""
  tok = lm.tokenizer
  p_ids = [prompts_lib.encode(tok, p.text) for p in prompts]
  pairs = [(k, tok.encode(c)) for k, p in enumerate(prompts)
           for c in prompts_lib.continuations(templates, p.item)]
  langs = [prompts[k].item.language for k, _ in pairs]
  scores = np.zeros(len(pairs))
  with tqdm(total=len(prompts), desc=desc, disable=not progress, dynamic_ncols=True) as bar:
    done = 0.0
    for idx in _batches(lm, langs, [len(p_ids[pairs[i][0]]) + len(pairs[i][1]) for i in range(len(pairs))],
                        batch_size):
      scores[idx] = np.asarray(lm.score([p_ids[pairs[i][0]] for i in idx], [pairs[i][1] for i in idx],
                                        batch_size=len(idx), **_language_kw(lm, langs[idx[0]])))
      done += sum(1 / len(prompts[pairs[i][0]].item.labels) for i in idx)
      bar.update(round(done) - bar.n)
  out, k = [], 0
  for p in prompts:
    n = len(p.item.labels)
    ll = scores[k:k + n]
    tokens = np.array([max(1, len(c)) for _, c in pairs[k:k + n]])
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
