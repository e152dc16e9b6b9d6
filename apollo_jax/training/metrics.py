"""Training metrics: MFU accounting, metrics.jsonl, a progress bar, optional wandb.

MFU (MaxText convention; only "model FLOPs" count — capacity padding, dispatch/combine einsums,
all-to-all and remat recomputation are overhead, not model FLOPs):

  d_attn   = num_heads * head_dim
  attn_p   = H*d_attn (q) + 2*H*num_kv_heads*head_dim (k, v) + d_attn*H (o)   per layer
  dense_p  = 3*H*I                                                            per dense layer
  moe_p    = top_k*3*H*I + H*E (router) [+ 3*H*I + H with moe.shared_expert]  per MoE layer
  N_active = L*attn_p + L_dense*dense_p + L_moe*moe_p + H*V (LM head / tied-embedding logits)
  FLOPs/token (train) = 6*N_active + 6*L*S*d_attn

i.e. forward = 2*N_active + 2*L*S*d_attn per token (QK^T and AV are 2*S*d_attn multiply-adds
each, halved for the causal mask) and forward+backward = 3x forward. Embedding lookups, norms,
biases, softmax and rotary are not counted.

  MFU = FLOPs/token * tokens/s / (peak FLOP/s per device * number of devices)

Peak is the dense bf16 number of the device kind (PEAK_FLOPS), or `config.peak_flops_per_device`
when > 0. On CPU the peak is NOMINAL (CPU_NOMINAL_FLOPS per process, the f32 matmul ceiling of the
2-core development machine); simulated CPU devices share the same cores, so the CPU peak is not
multiplied by the device count. CPU MFU is a sanity number, not a benchmark.
"""

import json
import math
import os
import time

import jax
import numpy as np
from etils import epath

from apollo_jax.model import config as model_config
from apollo_jax.runtime import workdir as workdir_io

# Dense bf16 peak FLOP/s per device; matched as lowercase substrings of `device.device_kind`,
# first match wins (so "v5 lite" is tried before "v5").
PEAK_FLOPS = (
    ("v6 lite", 918e12), ("v6e", 918e12),     # TPU v6e (Trillium)
    ("v5 lite", 197e12), ("v5e", 197e12),     # TPU v5e
    ("v5p", 459e12), ("v5", 459e12),          # TPU v5p reports "TPU v5"
    ("v4", 275e12),                           # TPU v4
    ("h200", 989e12), ("h100", 989e12),       # SXM, dense (no sparsity)
    ("a100", 312e12),
)
CPU_NOMINAL_FLOPS = 3e11


def active_params(config) -> int:
  """Matmul parameters one token passes through (k routed experts + router; see docstring)."""
  m = model_config.from_config(config)
  e, H, I, L, hd = m.moe, m.hidden_size, m.intermediate_size, m.num_layers, m.head_dim
  d_attn = m.num_heads * hd
  attn = H * d_attn + 2 * H * m.num_kv_heads * hd + d_attn * H
  moe = e.top_k * 3 * H * I + H * e.num_experts + ((3 * H * I + H) if e.shared_expert else 0)
  return L * attn + (L - len(e.layers)) * 3 * H * I + len(e.layers) * moe + H * m.vocab_size


def flops_per_token(config) -> float:
  """Training (forward + backward) model FLOPs per token, MaxText convention (see docstring)."""
  m = model_config.from_config(config)
  return (6.0 * active_params(config)
          + 6.0 * m.num_layers * config.data.seq_len * m.num_heads * m.head_dim)


def peak_flops(config, devices=None) -> tuple[float, str]:
  """(peak FLOP/s of all `devices` together, how it was chosen)."""
  devices = jax.devices() if devices is None else devices
  override = float(config.get("peak_flops_per_device", 0.0) or 0.0)
  if override > 0:
    return override * len(devices), "config.peak_flops_per_device"
  kind = devices[0].device_kind.lower()
  if devices[0].platform == "cpu":
    return CPU_NOMINAL_FLOPS * jax.process_count(), "cpu nominal"
  for key, value in PEAK_FLOPS:
    if key in kind:
      return value * len(devices), kind
  return float("nan"), f"unknown device kind {kind!r} (set config.peak_flops_per_device)"


def mfu(config, tokens_per_s: float, peak: float) -> float:
  return flops_per_token(config) * tokens_per_s / peak


def to_jsonable(value):
  """Scalars -> float/int, arrays -> (nested) lists; NaN/Inf -> None (strict JSON)."""
  a = np.asarray(value)
  if a.dtype.kind in "iub":
    return a.tolist()
  a = a.astype(np.float64)
  if a.ndim == 0:
    return float(a) if math.isfinite(a) else None
  return [to_jsonable(x) for x in a]


class Logger:
  """metrics.jsonl + tqdm bar + wandb; everything but the bar's math is a no-op off process 0.

  metrics.jsonl is only ever appended to (runtime/workdir.parse_metrics reads it): a resumed run
  appends {"resume": start_step} (-1 when nothing was checkpointed) and its records then replace
  the later ones; a torn last line from a crash is cut off first. The workdir is any etils/epath
  path: object stores (gs://, no append) get the whole object replaced, which they do atomically,
  at most every REMOTE_FLUSH_S and at close()."""

  REMOTE_FLUSH_S = 60.0

  def __init__(self, workdir: str, config, start_step: int):
    self.is_main = jax.process_index() == 0
    self.path = epath.Path(workdir) / "metrics.jsonl"
    self.remote = "://" in str(workdir)
    self.lines, self.flushed_at = [], time.time()
    self.wandb = None
    if self.is_main:
      self._open(start_step)
      if config.wandb.enabled:
        self.wandb = _init_wandb(config, workdir)
    from tqdm import tqdm
    self.bar = tqdm(total=config.steps, initial=start_step, disable=not self.is_main,
                    dynamic_ncols=True, mininterval=1.0, desc="train")
    self.t_start = time.time()

  def advance(self, n: int = 1, **postfix):
    self.bar.update(n)
    if postfix:
      self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

  def write(self, step: int, record: dict):
    if not self.is_main:
      return
    record = {"step": int(step), **{k: to_jsonable(v) for k, v in record.items()}}
    line = json.dumps(record, allow_nan=False) + "\n"
    self.lines.append(line)
    if not self.remote:
      with self.path.open("a") as f:
        f.write(line)
    elif time.time() - self.flushed_at > self.REMOTE_FLUSH_S:
      self._flush()
    if self.wandb is not None:
      self.wandb.log({k: v for k, v in record.items() if k != "step" and not isinstance(v, list)},
                     step=int(step))

  def print(self, msg: str):
    if self.is_main:
      self.bar.write(msg)

  def _open(self, start_step):
    if not self.path.exists():
      self.path.parent.mkdir(parents=True, exist_ok=True)
      self.path.write_text("")
      return
    text = self.path.read_text()
    _, good = workdir_io.parse_metrics(text, str(self.path))   # raises on a bad line, names it
    raw = text.encode()[:good].decode()
    marker = json.dumps({"resume": start_step if start_step > 0 else -1}) + "\n"
    if self.remote:
      self.lines = [raw, marker]
      self._flush()
      return
    if good < len(text.encode()):                   # cut the torn tail, never rewrite the rest
      os.truncate(str(self.path), good)
    if raw.strip():
      with self.path.open("a") as f:
        f.write(marker)

  def _flush(self):
    self.path.write_text("".join(self.lines))
    self.flushed_at = time.time()

  def close(self):
    if self.is_main and self.remote:
      self._flush()
    self.bar.close()
    if self.wandb is not None:
      self.wandb.finish()
      self.wandb = None


def _init_wandb(config, workdir: str):
  import wandb
  # Offline unless a key is configured: online with no reachable server, wandb.init blocks ~100 s.
  mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
  local_dir = None if "://" in str(workdir) else workdir      # wandb writes local files only
  return wandb.init(project=config.wandb.project, name=config.wandb.name or None, dir=local_dir,
                    config=config.to_dict(), mode=mode)
