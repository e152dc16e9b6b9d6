"""KV-cache generation: left-padded batches, one prefill, then one jitted step per new token.

Shapes are bucketed (batch and prompt length to powers of two, the cache to prompt bucket +
new-token bucket), so a new prompt length or a new token never recompiles. Prompts are
left-padded (segment id 0, never attended to) and every row carries its own positions, so
the last prompt token of every row sits in the last column: the prefill writes columns
[0, P-1) to the cache, and each step feeds one token per row (first the last prompt token)
and samples the next. A row stops at EOS (later tokens are padding); the loop ends when every
row has stopped or after max_new_tokens.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np


def bucket(n: int, minimum: int = 16) -> int:
  """The smallest power of two >= max(n, minimum)."""
  n = max(int(n), minimum, 1)
  return 1 << (n - 1).bit_length()


def round_up(n: int, multiple: int) -> int:
  """The smallest multiple of `multiple` >= n (e.g. batch rows the mesh's batch axes divide)."""
  return -(-int(n) // multiple) * multiple


def left_pad(seqs, length: int, pad_id: int):
  """Token lists -> (ids, segment_ids, positions) int32 [len(seqs), length], real tokens last."""
  B = len(seqs)
  ids = np.full((B, length), pad_id, np.int32)
  seg = np.zeros((B, length), np.int32)
  pos = np.zeros((B, length), np.int32)
  for r, s in enumerate(seqs):
    n = len(s)
    if n:
      ids[r, length - n:] = s
      seg[r, length - n:] = 1
      pos[r, length - n:] = np.arange(n)
  return ids, seg, pos


def sample(logits, rng, temperature, top_p):
  """Next token per row from fp32 logits [B, V]: argmax if temperature <= 0, else a draw from
  softmax(logits / temperature) restricted to the smallest top-probability set with mass >= top_p.
  temperature and top_p may be traced: one compiled step serves every setting."""
  def draw(logits):
    logits = logits / temperature

    def nucleus(logits):
      sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
      probs = jax.nn.softmax(sorted_logits, axis=-1)
      keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p          # the first token is always kept
      threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
      return jnp.where(logits >= threshold, logits, -jnp.inf)
    logits = jax.lax.cond(top_p < 1.0, nucleus, lambda x: x, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)
  greedy = lambda logits: jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.lax.cond(temperature > 0, draw, greedy, logits)


class Decoder:
  """Jitted forward, prefill and decode step of `module` (a Transformer), compiled once per shape
  bucket. `shared` gives one Decoder (and its compilations) to all modules of equal ModelConfig."""

  _shared = {}

  def __init__(self, module):
    self.module = module

  @classmethod
  def shared(cls, module):
    key = module.config            # a frozen ModelConfig (model/config.py): hashable
    if key not in cls._shared:
      cls._shared[key] = cls(module)
    return cls._shared[key]

  @functools.partial(jax.jit, static_argnums=(0,))
  def forward(self, params, ids, seg, pos, lang):
    return self.module.apply({"params": params}, ids, language_ids=lang, segment_ids=seg, positions=pos)

  @functools.partial(jax.jit, static_argnums=(0, 6))
  def prefill(self, params, ids, seg, pos, lang, cache_len):
    _, variables = self.module.apply({"params": params}, ids, language_ids=lang, segment_ids=seg,
                                     positions=pos, cache_len=cache_len, mutable=["cache"])
    return variables["cache"]

  @functools.partial(jax.jit, static_argnums=(0, 13), donate_argnums=(2,))
  def step(self, params, cache, tok, pos, live, done, lang, rng, eos_id, temperature, top_p, no_eos,
           cache_len):
    """Feeds tok [B] at pos [B]; returns (cache, next token [B], done [B], logits [B, V]).
    no_eos (a traced bool): EOS may not be sampled at this step (min_new_tokens)."""
    logits, variables = self.module.apply(
        {"params": params, "cache": cache}, tok[:, None], language_ids=lang, segment_ids=live[:, None],
        positions=pos[:, None], cache_len=cache_len, mutable=["cache"])
    logits = logits[:, 0]
    is_eos = jnp.arange(logits.shape[-1]) == eos_id
    nxt = sample(jnp.where(no_eos & is_eos, -jnp.inf, logits), rng, temperature, top_p)
    nxt = jnp.where(done, eos_id, nxt)
    return variables["cache"], nxt, done | (nxt == eos_id), logits

  def __hash__(self):
    return id(self)

  def __eq__(self, other):
    return self is other


def generate(decoder, params, prompts, max_new_tokens: int, eos_id: int, pad_id: int,
             temperature=0.0, top_p=1.0, seed=0, batch_multiple=1, language_id=None,
             return_logits=False, check_every=4, min_new_tokens=0):
  """Token lists -> generated token lists (each ends at its first EOS, included; EOS is never
  drawn among the first min_new_tokens). With return_logits, also the fp32 logits [n_steps, B, V]
  each step sampled from (before the EOS mask)."""
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
  B = len(prompts)
  Bp = round_up(bucket(B, 1), batch_multiple)
  lengths = np.array([len(p) for p in prompts] + [1] * (Bp - B), np.int32)
  P = bucket(int(lengths.max()))
  L = P + bucket(max_new_tokens)
  ids, seg, pos = left_pad(list(prompts) + [[pad_id]] * (Bp - B), P, pad_id)
  live = np.zeros(Bp, np.int32)
  live[:B] = 1
  seg *= live[:, None]                           # batch-padding rows: all padding
  lang = None if language_id is None else np.full((Bp, P), language_id, np.int32)
  cache = decoder.prefill(params, ids[:, :-1], seg[:, :-1], pos[:, :-1],
                          None if lang is None else lang[:, :-1], L)
  tok, p = jnp.asarray(ids[:, -1]), jnp.asarray(lengths - 1)
  done = jnp.asarray(live == 0)
  live_j = jnp.asarray(live)
  step_lang = None if lang is None else jnp.asarray(lang[:, :1])
  key = jax.random.key(seed)
  out, all_logits = [], []
  for t in range(max_new_tokens):
    cache, tok, done, logits = decoder.step(params, cache, tok, p, live_j, done, step_lang,
                                            jax.random.fold_in(key, t), eos_id, jnp.float32(temperature),
                                            jnp.float32(top_p), jnp.bool_(t < min_new_tokens), L)
    out.append(tok)
    if return_logits:
      all_logits.append(logits)
    p = p + 1
    if (t + 1) % check_every == 0 and bool(jnp.all(done)):
      break
  toks = np.asarray(jnp.stack(out, axis=1))[:B]
  result = []
  for row in toks:
    hits = np.flatnonzero(row == eos_id)
    result.append(row[:hits[0] + 1].tolist() if hits.size else row.tolist())
  if return_logits:
    return result, np.asarray(jnp.stack(all_logits))[:, :B]
  return result
