"""apollo_jax vs HF transformers (PyTorch) on the same model shape and tokens.

Both train the same architecture: Qwen2-MoE with the MoE in the last 2 layers (HF
`Qwen2MoeForCausalLM` with `mlp_only_layers`, no shared expert, built locally with random
weights), tied embeddings, float32, one AdamW step (with grad-norm clipping, as apollo_jax) per
measurement, plain top-k routing, exact on both sides (HF with its default experts
implementation, printed; apollo_jax with moe.impl="dropless"). `--dense` trains the same shape
with no MoE layer on both sides. Also times one MoE layer against one dense FFN (forward +
backward) at the same tokens.

Each system runs in its OWN process (torch's OpenMP pool and XLA's thread pool never share one),
and the processes are alternated round by round so slow machine phases hit both alike. Each
process warms up, then times `--steps` steps; the figure is the best step over all rounds, in
wall time and in CPU time. The load average is printed before and after, with a warning above 1:
figures from a loaded machine are not a measurement.

  python benchmarks/vs_torch.py                 # H512 I1536 8 layers, 4x512 tokens
  python benchmarks/vs_torch.py --dense         # the same shape, moe.layers=none on both sides
  python benchmarks/vs_torch.py --quick         # tiny shapes (CI: still runnable)
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from apollo_jax import config as cfg  # noqa: E402
from apollo_jax.model import layers  # noqa: E402
from apollo_jax.model.config import from_config  # noqa: E402
from apollo_jax.model.moe import MoEBlock  # noqa: E402
import moe_block  # noqa: E402
import train_step as ts_bench  # noqa: E402

QUICK = dict(hidden=32, inter=64, layers=3, heads=4, kv_heads=2, vocab=128, batch=2, seq=32, rounds=1)


def jax_config(a):
  c = cfg.load("tiny:routing=topk")
  m = c.model
  m.hidden_size, m.intermediate_size, m.num_layers = a.hidden, a.inter, a.layers
  m.num_heads, m.num_kv_heads, m.vocab_size, m.dtype = a.heads, a.kv_heads, a.vocab, "float32"
  c.moe.num_experts, c.moe.top_k, c.moe.impl = a.experts, a.top_k, "dropless"
  c.moe.layers = "none" if a.dense else "last:2"
  c.data.seq_len, c.global_batch, c.steps = a.seq, a.batch, 1000
  c.optim.weight_decay = 0.1
  c.mesh.update(data=1, fsdp=-1, expert=1, tensor=1)
  return cfg.validate(c, jax.device_count())


def torch_model(a):
  import torch
  from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM
  torch.manual_seed(0)
  hf = Qwen2MoeConfig(
      vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.inter, num_hidden_layers=a.layers,
      num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, num_experts=a.experts,
      num_experts_per_tok=a.top_k, moe_intermediate_size=a.inter, shared_expert_intermediate_size=0,
      mlp_only_layers=list(range(a.layers if a.dense else a.layers - 2)), norm_topk_prob=False, tie_word_embeddings=True,
      max_position_embeddings=a.seq, rope_theta=1e6, output_router_logits=False,
      router_aux_loss_coef=0.0)
  model = Qwen2MoeForCausalLM._from_config(hf, attn_implementation="sdpa", dtype=torch.float32)
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
  return model, opt, getattr(model.config, "_experts_implementation", "?")


def torch_step(model, opt, ids, labels):
  import torch

  def run():
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()
  return run


def timed(fn):
  w, c = time.perf_counter(), time.process_time()
  fn()
  return time.perf_counter() - w, time.process_time() - c


def moe_vs_ffn(a):
  """{name: step function} for one dense FFN and one dropless MoE block, fwd+bwd."""
  B = a.batch
  x = jax.random.normal(jax.random.PRNGKey(0), (B, a.seq, a.hidden), jnp.float32)
  seg = jnp.ones((B, a.seq), jnp.int32)
  ffn = layers.MLP(a.inter, 0.02, jnp.float32)
  v_ffn = ffn.init(jax.random.PRNGKey(2), x)
  c = jax_config(_with(a, dense=False))
  block = MoEBlock(from_config(c))
  v_moe = block.init(jax.random.PRNGKey(3), x, seg, None, True)
  f_ffn = moe_block.grad_step(ffn, v_ffn, x)
  f_moe = moe_block.grad_step(block, v_moe, x, seg, None, True)
  return {"dense_ffn": lambda: jax.block_until_ready(f_ffn(v_ffn, x)),
          "moe_dropless": lambda: jax.block_until_ready(f_moe(v_moe, x))}


def _with(a, **kw):
  return argparse.Namespace(**{**vars(a), **kw})


def worker(a):
  """Runs in its own process: builds one system, warms up, times a.steps steps, prints JSON."""
  rng = np.random.default_rng(0)
  ids = rng.integers(0, a.vocab, (a.batch, a.seq), dtype=np.int32)
  info = {}
  if a.worker == "torch":
    import torch
    model, opt, experts_impl = torch_model(a)
    t_ids = torch.from_numpy(ids.astype(np.int64))
    runs = {"torch": torch_step(model, opt, t_ids, t_ids.clone())}
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "experts": experts_impl}
  elif a.worker == "jax":
    config = jax_config(a)
    jax_run, state = ts_bench.build(config, input_ids=ids)
    holder = {"state": state}

    def jax_step():
      holder["state"] = jax_run(holder["state"])
    runs = {"apollo_jax": jax_step}
    mc = from_config(config)
    info = {"jax": jax.__version__, "device": jax.devices()[0].device_kind,
            "attention": mc.attention, "kernel": mc.moe.kernel}
  else:
    runs = moe_vs_ffn(a)
  best = {}
  for k, fn in runs.items():
    fn()                                   # compile / warm up
    times = [timed(fn) for _ in range(a.steps)]
    best[k] = [min(t[0] for t in times), min(t[1] for t in times)]
  print("RESULT " + json.dumps({"best": best, "info": info}))


def run_worker(a, name):
  args = [sys.executable, os.path.abspath(__file__), f"--worker={name}"] + [
      f"--{k}={getattr(a, k)}" for k in ("hidden", "inter", "layers", "heads", "kv_heads", "vocab",
                                         "experts", "top_k", "batch", "seq", "steps")]
  args += ["--dense"] if a.dense else []
  out = subprocess.run(args, capture_output=True, text=True, check=False)
  if out.returncode:
    sys.exit(f"{name} worker failed:\n{out.stderr[-3000:]}")
  line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
  return json.loads(line[len("RESULT "):])


def load_average(when):
  load = os.getloadavg()
  print(f"load average {when}: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
  return load


def busy_cpu_seconds():
  """CPU seconds the whole machine has spent busy since boot (Linux /proc/stat), or None."""
  try:
    with open("/proc/stat") as f:
      user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
  except (OSError, ValueError):
    return None
  return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def cpu_model():
  try:
    with open("/proc/cpuinfo") as f:
      info = f.read()
  except OSError:
    return "?"
  name = next((x.split(":", 1)[1].strip() for x in info.splitlines() if x.startswith("model name")), "?")
  return name + (", AVX-512" if "avx512f" in info else "") + (", AMX" if "amx_tile" in info else "")


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--hidden", type=int, default=512)
  p.add_argument("--inter", type=int, default=1536)
  p.add_argument("--layers", type=int, default=8)
  p.add_argument("--heads", type=int, default=8)
  p.add_argument("--kv_heads", type=int, default=2)
  p.add_argument("--vocab", type=int, default=8192)
  p.add_argument("--experts", type=int, default=7)
  p.add_argument("--top_k", type=int, default=2)
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq", type=int, default=512)
  p.add_argument("--dense", action="store_true", help="no MoE layer on either side")
  p.add_argument("--rounds", type=int, default=4, help="alternated rounds of one process each")
  p.add_argument("--steps", type=int, default=3, help="timed steps per process")
  p.add_argument("--quick", action="store_true", help="tiny shapes, one round (CI)")
  p.add_argument("--worker", choices=("torch", "jax", "layer"), help=argparse.SUPPRESS)
  a = p.parse_args()
  if a.quick:
    for k, v in QUICK.items():
      setattr(a, k, v)
  if a.worker:
    return worker(a)

  load = load_average("before")
  busy0, wall0 = busy_cpu_seconds(), time.perf_counter()
  names = ("torch", "jax") + (() if a.dense else ("layer",))
  best, info = {}, {}
  for r in range(a.rounds):
    for name in (names if r % 2 == 0 else names[::-1]):   # alternate who goes first
      res = run_worker(a, name)
      info.update(res["info"])
      for k, (w, c) in res["best"].items():
        old = best.get(k, [np.inf, np.inf])
        best[k] = [min(old[0], w), min(old[1], c)]
  load_average("after (counts this benchmark's own threads)")
  # The load average counts the benchmark itself; what disturbs it is the CPU that OTHER
  # processes used meanwhile: the machine's busy time minus this process tree's.
  others = None
  if busy0 is not None:
    ours = sum(sum(resource.getrusage(w)[:2]) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    others = (busy_cpu_seconds() - busy0 - ours) / (time.perf_counter() - wall0)
    print(f"other processes used {max(others, 0):.2f} CPUs on average during the run")
  noisy = load[0] > 1 or (others is not None and others > 0.1)

  tokens = a.batch * a.seq
  print(f"\n{info['device']}: {cpu_model()} ({os.cpu_count()} cpus), torch {info['torch']} ({info['threads']} "
        f"threads), jax {info['jax']}")
  moe = "no MoE layer" if a.dense else f"MoE: last 2, {a.experts} experts top-{a.top_k}"
  print(f"shape: H{a.hidden} I{a.inter} {a.layers} layers ({moe}), {a.heads} heads / "
        f"{a.kv_heads} kv, vocab {a.vocab}, tied, {a.batch}x{a.seq} tokens, float32, AdamW train "
        f"step; each system in its own process, best of {a.rounds} alternated rounds x "
        f"{a.steps} steps")
  print(f"torch experts: {info['experts']}, attention sdpa; apollo_jax: moe.impl=dropless "
        f"({info['kernel']} kernel), attention={info['attention']}\n")
  print(f"| {'':34s} | {'tokens/s (wall)':>15s} | {'tokens/s (cpu)':>15s} |")
  print(f"|{'-' * 36}|{'-' * 17}|{'-' * 17}|")
  model = "Qwen2MoeForCausalLM"
  for k, name in (("torch", f"HF transformers {model}"), ("apollo_jax", "apollo_jax")):
    print(f"| {name:34s} | {tokens / best[k][0]:15,.0f} | {tokens / best[k][1]:15,.0f} |")
  ratio = lambda i: best["torch"][i] / best["apollo_jax"][i]
  print(f"| {'apollo_jax / torch':34s} | {ratio(0):14.2f}x | {ratio(1):14.2f}x |")
  if not a.dense:
    lr = lambda i: best["moe_dropless"][i] / best["dense_ffn"][i]
    print(f"| {'MoE layer / dense FFN (fwd+bwd)':34s} | {lr(0):14.2f}x | {lr(1):14.2f}x |")
  if noisy:
    print("\nWARNING: the machine was not quiet (load average above 1 before the run, or other "
          "processes used more than 0.1 CPU during it): do not report these figures")


if __name__ == "__main__":
  main()
