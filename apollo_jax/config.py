"""Configuration: defaults for every field, big_vision-style config arguments, one validate().

A config file in `configs/` defines `get_config(arg=None)`; `arg` is the text after the colon
in `--config=configs/apollo_2b.py:routing=topk,moe_layers=last:4`. Fields are then overridden
on the command line with `--config.optim.lr=3e-4`.
"""

import math

import ml_collections

from apollo_jax import languages

ROUTING_MODES = ("hybrid", "topk", "language")
PACKING_MODES = ("segment", "causal")
REMAT_POLICIES = ("none", "full", "dots")
DTYPES = ("float32", "bfloat16", "float16")
MESH_AXES = ("data", "fsdp", "expert", "tensor")
ATTENTION_IMPLS = ("auto", "xla", "blocked", "cudnn", "splash", "pallas_gpu")
MOE_IMPLS = ("dropless", "capacity")
MOE_KERNELS = ("auto", "blocks", "ragged", "gmm")
MOE_DISPATCHES = ("auto", "gather_weights", "gather_tokens", "ragged_a2a")


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 42                        # params init, dropout-free training RNG (the original trains with 42)

  c.model = m = ml_collections.ConfigDict()
  m.vocab_size = 151936
  m.hidden_size = 896
  m.intermediate_size = 4864         # every expert is a full FFN of this width, as the original
  m.num_layers = 24
  m.num_heads = 14
  m.num_kv_heads = 2
  m.head_dim = 0                     # 0: hidden_size // num_heads
  m.rope_theta = 1e6
  m.rms_norm_eps = 1e-6
  m.tie_embeddings = True
  m.init_std = 0.02                  # N(0, init_std) for every kernel, as HF initializer_range
  m.dtype = "float32"                # compute dtype ("bfloat16" on TPU/GPU); params stay float32
  m.remat = "none"                   # none | full | dots (save matmul outputs) per decoder layer
  m.scan_layers = True               # scan each run of consecutive dense layers (fast compiles)
  # Attention kernel (model/attention.py): auto | xla | blocked | cudnn | splash | pallas_gpu.
  # auto = splash (Pallas TPU flash attention) on TPU, blocked (skips fully masked causal tiles)
  # on CPU and GPU; pallas_gpu = Pallas GPU flash attention (opt-in); cudnn = GPU flash attention,
  # only with data.packing="causal" (it takes no segment ids; a clear error otherwise).
  m.attention = "auto"
  # Inference and HF export: the longest prompt + generation accepted (HF config field).
  m.max_position_embeddings = 32768

  c.moe = e = ml_collections.ConfigDict()
  # MoE implementation (model/moe.py): "dropless" = every top-k assignment computed, as
  # the original (sorted grouped matmul, no capacity: capacity_factor/group_size unused);
  # "capacity" = GShard slots per group with drops (capacity_factor, group_size below).
  e.impl = "dropless"
  # Dropless grouped matmul (model/dropless.py): auto | blocks | ragged | gmm. auto = ragged
  # (jax.lax.ragged_dot, native) on TPU, blocks (a loop over row blocks) on CPU and GPU, where
  # ragged_dot expands to a dense dot over every expert; ragged on GPU is refused unless XLA_FLAGS
  # enables XLA's ragged-dot fusion. gmm = Pallas megablox: native on TPU, interpreted elsewhere
  # (slow: meant for tests).
  e.kernel = "auto"
  # Dropless dispatch over the mesh's expert axis (model/expert_parallel.py): auto |
  # gather_weights | gather_tokens | ragged_a2a. gather_weights: every device all-gathers every
  # expert's weights and computes its own tokens (the expert axis is data parallelism);
  # gather_tokens (ring of experts) and ragged_a2a keep each device's weights, gradients and Adam
  # state to its E / mesh.expert experts and move the tokens (ragged_a2a: TPU/GPU only). auto =
  # gather_tokens on every backend when mesh.expert > 1; with mesh.expert = 1 every choice is
  # gather_weights (nothing to move).
  e.dispatch = "auto"
  e.layers = "last:2"                # "last:N" | "all" | "none" (dense) | "3,7" explicit list
  e.num_experts = 7                  # real experts; language routing needs the map's size
  e.expert_map = "family7"           # family7 | major12 | lang50 (languages.EXPERT_MAPS)
  e.routing = "hybrid"               # hybrid (Hybrid-k) | topk | language
  e.top_k = 2
  e.norm_topk_prob = False           # released models: weights are raw softmax probs
  e.shared_expert = False            # always-on sigmoid-gated shared FFN (language-routing baseline)
  # Capacity per expert and group: C = max(min_capacity, ceil(capacity_factor * group_size * top_k / E)).
  # capacity_factor <= 0 means "no drop": C = group_size (every assignment fits).
  e.capacity_factor = 2.0            # training
  e.eval_capacity_factor = 0.0       # evaluation / generation: 0 = never drop (exact top-k, HF parity)
  e.min_capacity = 4
  e.group_size = 1024                # tokens per routing group; dispatch tensors are [G, S, E, C]
  e.expert_multiple = 0              # pad E to a multiple of this (0: the mesh's expert axis size)
  e.aux_loss_weight = 0.0            # Switch load-balancing loss coefficient (paper: 0)
  e.z_loss_weight = 0.0              # router z-loss coefficient (paper: 0)
  e.router_init_std = 0.02           # N(0, 0.02): HF's default init, kept by the original's upcycling
  e.analysis = False                 # also sow each token's chosen experts

  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, expert=1, tensor=1))  # one -1 = fill

  c.data = d = ml_collections.ConfigDict()
  d.train_files = "data/sample/apollo_moe_sample.json"   # path, glob or comma-separated list
  d.eval_files = ""                  # "" : hold out eval_fraction of train_files
  d.eval_fraction = 0.05
  d.tokenizer = "data/sample/tokenizer.model"            # sentencepiece .model or HF tokenizer.json
  d.eos_token = ""                   # tokenizer.json EOS when it has no <|endoftext|> (e.g. "<eos>")
  d.seq_len = 4096
  d.packing = "segment"              # segment: no attention across packed samples; causal: original
  d.order_seed = 3407                # priority-weighted ordering; 3407 is the original's seed
  d.priorities = ""                  # "" : defaults of data/mixture.py; else "key_prefix=prio:repeat,..."
  d.skip_bad_records = False
  d.num_workers = 0                  # grain worker processes
  d.cache_dir = ""                   # "" : <workdir>/data_cache (local or gs://..., any etils epath)
  # Pre-tokenised cache: the corpus is tokenised once, at build time.
  d.build_workers = 0                # processes tokenising at build time (0: every CPU of the host)

  # Training loop (top level: the names users type most, e.g. --config.steps=200).
  c.global_batch = 32                # packed rows per optimizer step (over all devices)
  c.grad_accum = 1                   # micro-batches per optimizer step
  c.steps = 1000                     # optimizer steps
  c.eval_every = 100                 # eval loss on the held-out split every N steps (0: never)
  c.eval_batches = 4
  c.log_every = 10
  c.init_from = ""                   # Orbax dir from convert_from_hf, or an HF Qwen2 / Qwen2-MoE dir
  c.peak_flops_per_device = 0.0      # MFU denominator; 0: table by device kind (metrics.PEAK_FLOPS)
  c.debug_nan_at_step = 0            # test hook: update N gets a NaN loss (0: off)

  # Memory (apollo_jax.loss, apollo_jax.plan).
  c.loss_chunk = 1024                # cross-entropy over chunks of this many positions: only
                                     # [rows, loss_chunk, V] fp32 logits at a time (0: whole rows)
  c.plan = "auto"                    # print the AOT memory/FLOP plan before step 1: auto (not
                                     # on CPU) | on | off
  c.device_memory_gb = 0.0           # plan budget per device; 0: the device's own (80 on CPU)

  c.optim = o = ml_collections.ConfigDict()
  o.lr = 1e-4                        # the released Apollo-MoE-0.5B run's peak lr
  o.warmup_ratio = 0.03
  o.horizon = 1.35                   # cosine spans horizon * steps: final lr ~0.17 peak (original)
  o.weight_decay = 0.1               # biases excluded, norms decayed (as the original)
  o.b1 = 0.9
  o.b2 = 0.999
  o.eps = 1e-8
  o.clip = 1.0

  c.ckpt = k = ml_collections.ConfigDict()
  k.every = 500
  k.keep = 3
  k.async_save = True

  c.wandb = w = ml_collections.ConfigDict()
  w.enabled = False
  w.project = "apollo_jax"
  w.name = ""

  # Run setup (apollo_jax/training/setup.py).
  c.epochs = 0.0                     # > 0: steps = epochs over the training rows (overrides steps)
  c.init_hint = ""                   # big configs: the HF model to start from (named in errors)
  c.allow_random_init = True         # big configs: False, so a missing init_from is an error

  # In-training benchmark evaluation (apollo_jax/evaluation/in_training.py): every `every` steps,
  # option log-likelihood scoring of a seeded dev subset of ApolloMoEBench (`fraction` of each
  # source, at least one question, as the original's 10% dev split), logged to metrics.jsonl and
  # wandb as bench/<language>, bench/major, bench/minor (and bench_norm/* for the per-token mean).
  c.bench_eval = b = ml_collections.ConfigDict()
  b.every = 0                        # steps between runs (0: off); also runs at the last step
  b.files = ""                       # ApolloMoEBench JSON: path, glob or comma-separated list
  b.fraction = 0.1                   # dev subset per source
  b.seed = 0                         # dev subset and few-shot selection
  b.shots = 3
  b.batch_size = 8                   # prompt/option rows per forward pass (logits are [rows, len, vocab])
  b.templates = ""                   # prompt wording JSON ("" : the built-in one)
  return c


def needs_real_setup(c, hf_model: str):
  """Big configs: no demo data, tokenizer from init_from, and init_from (`hf_model`) required."""
  c.data.train_files = ""
  c.data.tokenizer = ""              # "" : init_from's tokenizer.json
  c.init_hint = hf_model
  c.allow_random_init = False
  return c


def parse_arg(arg, **defaults):
  """'routing=topk,moe_layers=last:4,runlocal' -> dict over `defaults` (types follow defaults)."""
  out = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, eq, val = item.partition("=")
    if key not in out:
      raise ValueError(f"unknown config argument {key!r}; known: {', '.join(sorted(out))}")
    default = out[key]
    if not eq:
      val = True
    elif isinstance(default, bool):
      val = val.lower() in ("1", "true", "yes")
    elif isinstance(default, int):
      val = int(val)
    elif isinstance(default, float):
      val = float(val)
    out[key] = val
  return out


def apply_moe_args(config, args):
  """Common ablation arguments: routing, moe_layers, expert_map (num_experts follows the map)."""
  config.moe.routing = args["routing"]
  config.moe.layers = args["moe_layers"].replace(";", ",")
  config.moe.expert_map = args["expert_map"]
  config.moe.num_experts = languages.NUM_EXPERTS[args["expert_map"]]
  if args["routing"] == "language":      # language-specific baseline: top-1 + shared (docs/original.md)
    config.moe.top_k = 1
    config.moe.shared_expert = True
  return config


MOE_ARGS = dict(routing="hybrid", moe_layers="last:2", expert_map="family7")


# The released sizes: one row each for configs/apollo_moe_0p5b.py, apollo_2b.py, apollo_moe_7b.py.
# Every size: Qwen2 upcycled with the 7 family experts in the last 2 layers, bf16 compute, full
# remat. grad_accum and mesh_tensor fit a step of 32 rows x 4096 tokens on 8 x 80 GB (the plans
# in docs/training.md); lr: the released 0.5B run's 1e-4, the dense Apollo2-7B's 1e-5.
SIZES = {
    "0.5b": dict(hf="Qwen/Qwen2-0.5B", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                 num_layers=24, num_heads=14, num_kv_heads=2, tie_embeddings=True,
                 grad_accum=2, mesh_tensor=1, lr=1e-4),
    "1.5b": dict(hf="Qwen/Qwen2-1.5B", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                 num_layers=28, num_heads=12, num_kv_heads=2, tie_embeddings=True,
                 grad_accum=4, mesh_tensor=1, lr=1e-4),
    "7b": dict(hf="Qwen/Qwen2-7B", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
               num_layers=28, num_heads=28, num_kv_heads=4, tie_embeddings=False,
               grad_accum=8, mesh_tensor=2, lr=1e-5),
}


def released_config(size: str, arg=None):
  """The config of a released size (SIZES) with the ablation arguments `arg` (MOE_ARGS)."""
  row = SIZES[size]
  args = parse_arg(arg, **MOE_ARGS)
  c = base_config()
  for k in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
            "num_kv_heads", "tie_embeddings"):
    c.model[k] = row[k]
  c.model.dtype = "bfloat16"
  c.model.remat = "full"
  c.grad_accum, c.mesh.tensor, c.optim.lr = row["grad_accum"], row["mesh_tensor"], row["lr"]
  apply_moe_args(c, args)
  needs_real_setup(c, row["hf"])     # init_from, tokenizer, train_files: see apollo_jax/training/setup.py
  c.data.eval_fraction = 0.0         # never drop training data silently; evaluate on data.eval_files
  return c


def moe_layer_indices(layers, num_layers):
  """Parse `moe.layers` into a sorted tuple of MoE decoder-layer indices."""
  spec = str(layers).strip()
  if spec == "none":
    return ()
  if spec == "all":
    return tuple(range(num_layers))
  if spec.startswith("last:"):
    n = int(spec[5:])
    if not 0 <= n <= num_layers:
      raise ValueError(f"moe.layers={spec!r}: N must be in [0, {num_layers}]")
    return tuple(range(num_layers - n, num_layers))
  try:
    idx = sorted({int(x) for x in spec.replace(";", ",").split(",") if x.strip()})
  except ValueError:
    raise ValueError(f"moe.layers={spec!r}: expected 'last:N', 'all', 'none' or a list like '22,23'") from None
  if idx and not (0 <= idx[0] and idx[-1] < num_layers):
    raise ValueError(f"moe.layers={spec!r}: indices must be in [0, {num_layers})")
  return tuple(idx)


def expert_multiple(config) -> int:
  m = config.moe.expert_multiple
  return m if m > 0 else max(1, config.mesh.expert)


def padded_num_experts(config) -> int:
  """E rounded up to a multiple of `moe.expert_multiple` (padded experts are never routed to)."""
  m = expert_multiple(config)
  return -(-config.moe.num_experts // m) * m


def capacity(tokens_per_group: int, num_experts: int, top_k: int, capacity_factor: float,
             min_capacity: int) -> int:
  """Slots per expert per group: max(min_capacity, ceil(cf * S * k / E)), at most S; cf<=0: S."""
  if capacity_factor <= 0:
    return tokens_per_group
  c = max(min_capacity, math.ceil(capacity_factor * tokens_per_group * top_k / num_experts))
  return min(c, tokens_per_group)


def mesh_shape(config, num_devices: int) -> dict:
  """Mesh axis sizes with the one -1 filled; a clear error when it does not fit the devices."""
  sizes = {a: int(config.mesh[a]) for a in MESH_AXES}
  fills = [a for a, s in sizes.items() if s == -1]
  bad = [a for a, s in sizes.items() if s == 0 or s < -1]
  if bad or len(fills) > 1:
    raise ValueError(f"mesh {sizes}: every axis must be a positive size, with at most one -1 (fill)")
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if fills:
    if num_devices % fixed:
      raise ValueError(f"mesh {sizes} does not fit {num_devices} devices: the fixed axes multiply to "
                       f"{fixed}, which does not divide {num_devices}. Change config.mesh.")
    sizes[fills[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise ValueError(f"mesh {sizes} has {fixed} devices but {num_devices} are available; "
                     f"set one axis to -1 or make the sizes multiply to {num_devices}.")
  return sizes


# Numeric ranges that validate() enforces: field -> "interval" in the notation the error prints:
# "[a, b)" or "[a, inf)", "(a, ..." where a itself is refused. A value outside is refused before
# anything is built (else: ZeroDivision, a run that trains backwards, a checkpoint policy that
# deletes every checkpoint...).
RANGES = {
    "model.vocab_size": "[1, inf)", "model.hidden_size": "[1, inf)", "model.intermediate_size": "[1, inf)",
    "model.num_layers": "[1, inf)", "model.num_heads": "[1, inf)", "model.num_kv_heads": "[1, inf)",
    "model.head_dim": "[0, inf)", "model.rope_theta": "(0, inf)", "model.rms_norm_eps": "[0, inf)",
    "model.init_std": "[0, inf)", "moe.router_init_std": "[0, inf)", "moe.aux_loss_weight": "[0, inf)",
    "moe.z_loss_weight": "[0, inf)", "moe.expert_multiple": "[0, inf)",
    "data.seq_len": "[2, inf)", "data.eval_fraction": "[0, 1)", "data.num_workers": "[0, inf)",
    "data.build_workers": "[0, inf)",
    "global_batch": "[1, inf)", "grad_accum": "[1, inf)", "steps": "[1, inf)", "eval_every": "[0, inf)",
    "log_every": "[1, inf)", "loss_chunk": "[0, inf)",
    "optim.lr": "[0, inf)", "optim.warmup_ratio": "[0, 1)", "optim.horizon": "[1, inf)",
    "optim.weight_decay": "[0, inf)", "optim.b1": "[0, 1)", "optim.b2": "[0, 1)", "optim.eps": "(0, inf)",
    "optim.clip": "(0, inf)", "ckpt.every": "[1, inf)", "ckpt.keep": "[1, inf)", "bench_eval.every": "[0, inf)",
}


def _in_range(v, interval: str) -> bool:
  low, high = (float(x) for x in interval[1:-1].split(","))
  return (v > low if interval[0] == "(" else v >= low) and v < high


def _field(config, name):
  for k in name.split("."):
    if k not in config:
      return None
    config = config[k]
  return config


def validate(config, num_devices: int | None = None):
  """Fail early, with a message that says what to change. Returns the config."""
  m, e = config.model, config.moe

  def need(cond, msg):
    if not cond:
      raise ValueError(f"invalid config: {msg}")

  for name, interval in RANGES.items():
    v = _field(config, name)
    if v is None:
      continue
    need(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
         f"{name}={v!r} must be a finite number")
    need(_in_range(v, interval), f"{name}={v!r} is out of range: it must be in {interval}")

  need(m.num_heads % m.num_kv_heads == 0,
       f"model.num_heads={m.num_heads} must be a multiple of model.num_kv_heads={m.num_kv_heads}")
  need(m.head_dim > 0 or m.hidden_size % m.num_heads == 0,
       f"model.hidden_size={m.hidden_size} is not divisible by num_heads={m.num_heads}; set model.head_dim")
  need(m.dtype in DTYPES, f"model.dtype={m.dtype!r}; choose one of {DTYPES}")
  need(m.remat in REMAT_POLICIES, f"model.remat={m.remat!r}; choose one of {REMAT_POLICIES}")
  moe_idx = moe_layer_indices(e.layers, m.num_layers)
  need(e.routing in ROUTING_MODES, f"moe.routing={e.routing!r}; choose one of {ROUTING_MODES}")
  need(e.impl in MOE_IMPLS, f"moe.impl={e.impl!r}; choose one of {MOE_IMPLS}")
  need(e.kernel in MOE_KERNELS, f"moe.kernel={e.kernel!r}; choose one of {MOE_KERNELS}")
  dispatch = e.get("dispatch", "auto")
  need(dispatch in MOE_DISPATCHES, f"moe.dispatch={dispatch!r}; choose one of {MOE_DISPATCHES}")
  need(dispatch == "auto" or e.impl == "dropless",
       f"moe.dispatch={dispatch!r} applies to moe.impl='dropless' only (capacity dispatches by "
       "GSPMD's all-to-all of its [E, G, C, M] buffers); set moe.dispatch=auto")
  need(m.attention in ATTENTION_IMPLS, f"model.attention={m.attention!r}; choose one of {ATTENTION_IMPLS}")
  need(m.attention != "cudnn" or config.data.packing == "causal",
       "model.attention='cudnn' takes no segment ids, so it cannot keep packed samples apart; use "
       "data.packing='causal' (the original's packing) or model.attention='auto'/'blocked'/'xla'")
  need(m.attention not in ("splash", "pallas_gpu") or config.data.seq_len % 128 == 0,  # attention.TILE
       f"model.attention={m.attention!r} computes blocks of 128 tokens, so data.seq_len="
       f"{config.data.seq_len} would always fall back to the full [S, S] xla attention; set "
       "data.seq_len to a multiple of 128, or model.attention='xla'")
  need(e.expert_map in languages.EXPERT_MAPS,
       f"moe.expert_map={e.expert_map!r}; choose one of {languages.EXPERT_MAPS}")
  if moe_idx:
    need(e.num_experts >= 1, "moe.num_experts must be >= 1")
    need(1 <= e.top_k <= e.num_experts, f"moe.top_k={e.top_k} must be in [1, num_experts={e.num_experts}]")
    if e.routing in ("hybrid", "language"):
      n = languages.NUM_EXPERTS[e.expert_map]
      need(e.num_experts == n, f"moe.routing={e.routing!r} with expert_map={e.expert_map!r} needs "
                               f"moe.num_experts={n} (one expert per map entry), got {e.num_experts}")
    need(e.group_size >= 1, "moe.group_size must be >= 1")
    need(e.min_capacity >= 1, "moe.min_capacity must be >= 1")
  need(config.data.packing in PACKING_MODES,
       f"data.packing={config.data.packing!r}; choose one of {PACKING_MODES}")
  t = config
  need(t.grad_accum >= 1 and t.global_batch % t.grad_accum == 0,
       f"global_batch={t.global_batch} must be divisible by grad_accum={t.grad_accum}")
  need(t.get("epochs", 0) >= 0, "epochs must be >= 0 (0: use steps)")
  if num_devices is not None:
    sizes = mesh_shape(config, num_devices)
    if config.mesh.expert != -1 or e.expert_multiple > 0:
      padded = padded_num_experts(config)
      need(padded % sizes["expert"] == 0 or not moe_idx,
           f"mesh expert axis {sizes['expert']} does not divide the {padded} padded experts; set "
           f"moe.expert_multiple to a multiple of {sizes['expert']} or change mesh.expert")
    else:
      need(not moe_idx, "mesh.expert=-1 with MoE layers: give mesh.expert a size (or set moe.expert_multiple)")
    batch_shards = sizes["data"] * sizes["fsdp"] * sizes["expert"]
    micro = t.global_batch // t.grad_accum
    need(micro % batch_shards == 0,
         f"micro-batch {micro} rows (global_batch / grad_accum) must be divisible by "
         f"data*fsdp*expert = {batch_shards} mesh devices")
    need(m.num_kv_heads % sizes["tensor"] == 0 or sizes["tensor"] == 1,
         f"mesh tensor axis {sizes['tensor']} must divide model.num_kv_heads={m.num_kv_heads}")
  return config


def load(spec: str) -> ml_collections.ConfigDict:
  """'configs/tiny.py:routing=topk' (or 'tiny:routing=topk') -> get_config('routing=topk')."""
  import importlib.util
  import os
  path, _, arg = spec.partition(":")
  if not path.endswith(".py"):
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", path + ".py")
  if not os.path.exists(path):
    raise FileNotFoundError(f"config file {path!r} does not exist")
  mod_spec = importlib.util.spec_from_file_location("apollo_config", path)
  mod = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(mod)
  return mod.get_config(arg or None)
