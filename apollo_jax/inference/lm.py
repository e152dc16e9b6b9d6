"""One inference API for every model this stack can read.

  lm = inference.load(PATH)            # training workdir | convert_from_hf dir | HF checkpoint dir
  lm.logits([[1, 2, 3]])               # float32 numpy [B, S, V]
  lm.generate(["User:Hi\\nAssistant:"], max_new_tokens=32)   # KV cache, greedy by default
  lm.chat([{"role": "user", "content": "Hi"}])
  lm.score(["2+2="], ["4"])            # summed log-probabilities of the continuations

PATH kinds: a training workdir (WORKDIR/config.json + the latest complete checkpoint, or `step`),
a `convert_from_hf` output (params/ + model_config.json) or an HF dir (config.json + safetensors:
Qwen2, Qwen2-MoE, the released Apollo-MoE layout, our own export). Params are placed on a mesh
from the config (FSDP / expert / tensor sharded) when it fits the devices, else FSDP over all of
them. Inference routes by plain top-k and never drops a token (`eval_capacity_factor=0`); Hybrid-k
needs no language ids at inference, `routing='language'` does (`language=` below).
"""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from apollo_jax import config as cfg
from apollo_jax import languages
from apollo_jax.inference import decoding
from apollo_jax.hf import config as hf_config
from apollo_jax.hf import load as hf_load
from apollo_jax.runtime import sharding
from apollo_jax.runtime import workdir as workdir_io
from apollo_jax.data import chat as chat_lib
from apollo_jax.data.tokenizer import HFTokenizer, load_tokenizer
from apollo_jax.model.transformer import abstract_variables, build_model, unbox


def inference_config(config, expert_multiple=None):
  """A copy for inference: never drop a token, no remat, no per-token analysis outputs."""
  c = ml_collections.ConfigDict(config.to_dict())
  c.model.remat = "none"
  c.moe.eval_capacity_factor = 0.0
  c.moe.analysis = False
  if expert_multiple is not None:
    c.moe.expert_multiple = expert_multiple
  return c


def choose_mesh(config, devices=None, mesh=None):
  """(mesh, config with that mesh): config.mesh (or `mesh`, a dict of axis sizes) if it fits the
  devices and the params divide over it, else FSDP over all devices, else one device."""
  devices = list(jax.devices() if devices is None else devices)
  candidates = [mesh] if mesh is not None else [   # None: one device
      dict(config.mesh.to_dict()), dict(data=1, fsdp=-1, expert=1, tensor=1), None]
  errors = []
  for cand in candidates:
    c = ml_collections.ConfigDict(config.to_dict())
    devs = devices
    if cand is None:
      devs, cand = devices[:1], dict(data=1, fsdp=1, expert=1, tensor=1)
    c.mesh.update(cand)
    try:
      sizes = cfg.mesh_shape(c, len(devs))
      v = ml_collections.ConfigDict(c.to_dict())   # inference pads its batches to the mesh instead
      v.global_batch, v.grad_accum = sizes["data"] * sizes["fsdp"] * sizes["expert"], 1
      cfg.validate(v, len(devs))
      m = sharding.make_mesh(c, devs)
      sharding.check_divisible(*_abstract(c, m))
      return m, c
    except ValueError as e:
      errors.append(f"{cand}: {e}")
  raise ValueError("no mesh fits this model on these devices: " + "; ".join(errors))


def _abstract(config, mesh):
  """(unboxed abstract params, their NamedShardings on `mesh`)."""
  boxed = abstract_variables(build_model(config, mesh))
  with sharding.activate(mesh):
    shardings = sharding.param_shardings(boxed, mesh)["params"]
  return unbox(boxed)["params"], shardings


class LM:
  """A model ready for inference: .config .module .params .tokenizer .mesh (see module doc)."""

  def __init__(self, config, params, tokenizer=None, mesh=None, source="", eos_id=None, kind="params"):
    self.config, self.params, self.tokenizer, self.source = config, params, tokenizer, source
    self.kind = kind          # where it came from: workdir | converted | hf | params
    # EOS: the tokenizer's, else the checkpoint's (HF generation_config), else none (-1: never stop)
    self.eos_id = tokenizer.eos_id if tokenizer is not None else (-1 if eos_id is None else eos_id)
    self.mesh = mesh if mesh is not None else choose_mesh(config)[0]
    self.module = build_model(config, self.mesh)
    self._decoder = decoding.Decoder.shared(self.module)
    self.max_len = int(config.model.get("max_position_embeddings", 32768))

  # ------------------------------------------------------------------------------------ helpers

  @property
  def batch_multiple(self) -> int:
    return int(np.prod([self.mesh.shape[a] for a in sharding.BATCH_AXES]))

  def _tok(self):
    if self.tokenizer is None:
      raise ValueError(f"{self.source or 'this model'} has no tokenizer: pass token-id lists, or "
                       "load(..., tokenizer='path/to/tokenizer.model|tokenizer.json')")
    return self.tokenizer

  def _encode(self, items, what):
    """Strings or token-id lists -> (token lists, were_strings)."""
    items = list(items)
    if all(isinstance(x, str) for x in items):
      return [self._tok().encode(x) for x in items], True
    out = []
    for i, x in enumerate(items):
      ids = [] if isinstance(x, str) else [int(t) for t in np.asarray(x).reshape(-1)]
      bad = [t for t in ids if not 0 <= t < self.config.model.vocab_size]
      if isinstance(x, str) or bad:
        raise ValueError(f"{what}[{i}]: expected all strings or all token-id lists with ids in "
                         f"[0, {self.config.model.vocab_size}); got {x!r:.80}")
      out.append(ids)
    return out, False

  def _language_id(self, language):
    if language is None:
      return None
    if language not in languages.CODES:
      raise ValueError(f"language={language!r} is not one of the 50 codes ({', '.join(languages.CODES)})")
    return languages.CODES.index(language)

  def _check_len(self, n, what):
    if n > self.max_len:
      raise ValueError(f"{what} is {n} tokens, longer than the model's limit of {self.max_len} "
                       "(model.max_position_embeddings); shorten it or lower max_new_tokens")

  def _pad_rows(self, *arrays):
    rows = arrays[0].shape[0]
    n = decoding.round_up(rows, self.batch_multiple)
    return [None if a is None else np.concatenate([a, np.zeros((n - rows,) + a.shape[1:], a.dtype)])
            for a in arrays]

  # ------------------------------------------------------------------------------------- the API

  def logits(self, input_ids, language_ids=None, segment_ids=None, positions=None):
    """float32 numpy [B, S, V] of one forward pass (inference routing; nothing dropped)."""
    ids = np.asarray(input_ids, np.int32)
    if ids.ndim != 2:
      raise ValueError(f"input_ids must be [batch, length], got shape {ids.shape}")
    self._check_len(ids.shape[1], "input")
    if ids.size and not (0 <= ids.min() and ids.max() < self.config.model.vocab_size):
      raise ValueError(f"input_ids must be in [0, {self.config.model.vocab_size})")
    B, S = ids.shape
    seg = np.ones_like(ids) if segment_ids is None else np.asarray(segment_ids, np.int32)
    pos = np.broadcast_to(np.arange(S, dtype=np.int32), (B, S)) if positions is None else positions
    lang = None if language_ids is None else np.asarray(language_ids, np.int32)
    ids, seg, pos, lang = self._pad_rows(ids, seg, np.asarray(pos, np.int32), lang)
    with sharding.activate(self.mesh):
      out = self._decoder.forward(self.params, ids, seg, pos, lang)
    return np.asarray(out, np.float32)[:B]

  def score(self, prompts, continuations, batch_size=8, language=None):
    """Summed log-probability of each continuation given its prompt: float64 numpy [N].
    Strings are tokenised separately (prompt, then continuation), as the chat template does."""
    prompts, continuations = list(prompts), list(continuations)
    if len(prompts) != len(continuations):
      raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
    p_ids, _ = self._encode(prompts, "prompts")
    c_ids, _ = self._encode(continuations, "continuations")
    for i, p in enumerate(p_ids):
      if not p:
        raise ValueError(f"prompts[{i}] is empty: the first continuation token needs a context")
      self._check_len(len(p) + len(c_ids[i]), f"prompts[{i}] + continuations[{i}]")
    lang = self._language_id(language)
    seqs = [p + c for p, c in zip(p_ids, c_ids)]
    out = np.zeros(len(seqs), np.float64)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    rows_per_batch = min(batch_size, decoding.bucket(len(seqs), 1))   # one shape per length bucket
    for start in range(0, len(order), batch_size):
      rows = order[start:start + batch_size]
      S = decoding.bucket(max(len(seqs[i]) for i in rows))
      batch = [seqs[i] for i in rows] + [[]] * (rows_per_batch - len(rows))
      ids, seg, pos = decoding.left_pad(batch, S, 0)
      lang_ids = None if lang is None else np.full_like(ids, lang)
      ids, seg, pos, lang_ids = self._pad_rows(ids, seg, pos, lang_ids)
      with sharding.activate(self.mesh):
        lp = np.asarray(_target_logprobs(self._decoder.forward(self.params, ids, seg, pos, lang_ids), ids))
      for r, i in enumerate(rows):
        n = len(c_ids[i])             # the continuation is the last n tokens of the row
        out[i] = float(np.sum(lp[r, S - 1 - n:S - 1], dtype=np.float64)) if n else 0.0
    return out

  def generate(self, prompts, max_new_tokens=128, temperature=0.0, top_p=1.0, seed=0,
               batch_size=16, language=None, progress=None, min_new_tokens=0):
    """Strings -> generated strings (EOS removed); token-id lists -> generated token-id lists
    (ending with EOS when the model stopped; never before min_new_tokens tokens, as HF's
    `min_new_tokens`). Greedy by default; sampling is seeded."""
    ids, strings = self._encode(prompts, "prompts")
    eos = self.eos_id
    pad = self.tokenizer.pad_id if self.tokenizer is not None else max(eos, 0)
    for i, p in enumerate(ids):
      if not p:
        raise ValueError(f"prompts[{i}] is empty")
      self._check_len(len(p) + max_new_tokens, f"prompts[{i}] ({len(p)} tokens) + max_new_tokens")
    if not 0 < top_p <= 1:
      raise ValueError(f"top_p={top_p} must be in (0, 1]")
    if not temperature >= 0:
      raise ValueError(f"temperature={temperature} must be >= 0 (0: greedy)")
    lang = self._language_id(language)
    out = [None] * len(ids)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    for start in range(0, len(order), batch_size):
      rows = order[start:start + batch_size]
      with sharding.activate(self.mesh):
        gen = decoding.generate(self._decoder, self.params, [ids[i] for i in rows], max_new_tokens, eos,
                                pad, temperature, top_p, seed + start, self.batch_multiple, lang,
                                min_new_tokens=min_new_tokens)
      for r, i in enumerate(rows):
        out[i] = gen[r]
      if progress is not None:
        progress(len(rows))
    return [self.decode(g) for g in out] if strings else out

  def decode(self, ids) -> str:
    """Generated ids -> text, without EOS (and ids past the tokenizer's vocabulary)."""
    vocab = self._tok().vocab_size
    return self.tokenizer.decode([t for t in ids if t != self.eos_id and t < vocab])

  def chat(self, messages, **kwargs):
    """One conversation ([{"role": "user"|"assistant", "content": str}, ...], ending with a user
    turn) -> the assistant's reply; a list of conversations -> a list of replies."""
    single = bool(messages) and isinstance(messages[0], dict)
    convs = [messages] if single else messages
    replies = [self.decode(g) for g in self.generate([self.chat_prompt(m) for m in convs], **kwargs)]
    return replies[0] if single else replies

  def chat_prompt(self, messages) -> list:
    """Token ids of the training chat format up to the reply: `User:q\\nAssistant:a\\n...User:q\\nAssistant:`."""
    roles = [m.get("role") for m in messages]
    want = ["user" if i % 2 == 0 else "assistant" for i in range(len(messages))]
    if not messages or roles != want or roles[-1] != "user":
      raise ValueError(f"chat messages must alternate user/assistant, start and end with 'user' "
                       f"(the training format has no system prompt); got roles {roles}")
    bad = [i for i, m in enumerate(messages) if not isinstance(m.get("content"), str)]
    if bad:
      raise ValueError(f"chat message {bad[0]} has no string 'content' (got {messages[bad[0]]!r}); each "
                       "message is {'role': 'user'|'assistant', 'content': str}")
    ids, _ = chat_lib.ChatEncoder(self._tok())([m["content"] for m in messages])
    return ids[:-1].tolist() + chat_lib.ChatEncoder(self._tok())._assistant


@jax.jit
def _target_logprobs(logits, ids):
  """[B, S] log p(ids[t] | ids[<t]) at column t-1 (last column 0)."""
  lp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  got = jnp.take_along_axis(lp, ids[:, 1:, None], axis=-1)[..., 0]
  return jnp.pad(got, ((0, 0), (0, 1)))


# ----------------------------------------------------------------------------------------- load

def _hf_tokenizer(path):
  if not os.path.isfile(os.path.join(path, "tokenizer.json")):
    return None
  eos = ""
  tc = os.path.join(path, "tokenizer_config.json")
  if os.path.isfile(tc):
    with open(tc) as f:
      e = json.load(f).get("eos_token") or ""
    eos = e.get("content", "") if isinstance(e, dict) else e
  return HFTokenizer(os.path.join(path, "tokenizer.json"), eos)


def _hf_eos(path):
  for name in ("generation_config.json", "config.json"):
    f = os.path.join(path, name)
    if os.path.isfile(f):
      with open(f) as fh:
        eos = json.load(fh).get("eos_token_id")
      if eos is not None:
        return int(eos[0] if isinstance(eos, list) else eos)
  return None


def _place(config, params, devices=None, mesh=None):
  """(mesh, config, device params) for host params: experts re-padded to the chosen mesh."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.moe.expert_multiple = 0               # follow the inference mesh's expert axis
  mesh_, config = choose_mesh(config, devices, mesh)
  params = hf_load.repad_experts(jax.tree.map(lambda x: np.asarray(x, np.float32), params), config)
  _, shardings = _abstract(config, mesh_)
  return mesh_, config, jax.device_put(params, shardings)


def load(path, step=None, tokenizer=None, dtype=None, devices=None, mesh=None) -> LM:
  """An LM for `path` (see module doc). `step`: a workdir checkpoint (default: the latest
  complete one); `tokenizer`: a path or tokenizer object (default: the model's own); `dtype`:
  compute dtype override ('float32' | 'bfloat16'); `devices` / `mesh` (dict of axis sizes)."""
  path = os.fspath(path)
  kind = workdir_io.model_dir_kind(path)
  tok, eos = None, None
  if kind == "workdir":
    config = workdir_io.read_config(path)
    steps = workdir_io.checkpoint_steps(path)
    if not steps:
      raise FileNotFoundError(f"{path}/checkpoints has no complete checkpoint yet")
    if step is None:
      step = steps[-1]
    elif step not in steps:
      raise FileNotFoundError(f"{path}: no complete checkpoint at step {step}; available: {steps}")
    # the checkpoint's expert padding was fixed by the training mesh: keep it
    config = inference_config(config, cfg.padded_num_experts(config))
    tok_path = workdir_io.tokenizer_path(path, config)
    tok = load_tokenizer(tok_path, config.data.eos_token) if tok_path else None
  elif kind == "converted":
    params, meta = hf_load.load_params(path)
    config = cfg.base_config()
    config.model.update(meta["model"])
    config.moe.update(meta["moe"])
    config = inference_config(config)
  else:
    hf_json = hf_config.read_hf_config(path)
    config = inference_config(hf_config.config_from_hf(hf_json))
    config.model.max_position_embeddings = int(hf_json.get("max_position_embeddings", 32768))
    tok, eos = _hf_tokenizer(path), _hf_eos(path)
  if dtype is not None:
    config.model.dtype = dtype
  if isinstance(tokenizer, (str, os.PathLike)):
    tok = load_tokenizer(os.fspath(tokenizer), config.data.eos_token)
  elif tokenizer is not None:
    tok = tokenizer
  cfg.validate(config)
  if kind == "workdir":
    mesh_, config = choose_mesh(config, devices, mesh)
    abstract, shardings = _abstract(config, mesh_)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    params = workdir_io.restore_params(path, step, target)
  else:
    if kind == "hf":
      params = hf_load.params_from_hf(hf_load.load_hf_state(path), config)
    mesh_, config, params = _place(config, params, devices, mesh)
  logging.info("loaded %s (%s%s) on mesh %s", path, kind, f", step {step}" if kind == "workdir" else "",
               dict(mesh_.shape))
  return LM(config, params, tok, mesh_, source=path, eos_id=eos, kind=kind)


def from_params(config, params, tokenizer=None, devices=None, mesh=None, eos_id=None) -> LM:
  """An LM from an in-memory config and (host or device) params, e.g. in tests."""
  mesh_, config, params = _place(inference_config(config), params, devices, mesh)
  return LM(config, params, tokenizer, mesh_, eos_id=eos_id)
