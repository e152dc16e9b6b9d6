"""apollo_jax.plan: memory and FLOPs of the compiled train step against hand counts and a real
compile; the train hook; the CLI on the 0.5B shape; bf16 all-gathers of FSDP weights."""

import glob
import math
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from apollo_jax.training import metrics as mx
from apollo_jax.training import optimizer
from apollo_jax.plan import parse_mesh
from apollo_jax.training import memory_plan
from apollo_jax.runtime import sharding
from apollo_jax.training import step as ts
from apollo_jax.model import transformer
from configs import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICES = 4


def _dense_tiny():
  c = tiny.get_config("moe_layers=none")
  c.global_batch, c.data.seq_len, c.loss_chunk, c.plan = 8, 64, 16, "on"
  return c


@pytest.fixture(scope="module")
def hooked():
  """(config, mesh, state, compiled step, printed lines) from train's hook on 4 devices."""
  c = _dense_tiny()
  mesh = sharding.make_mesh(c, jax.devices()[:DEVICES])
  with sharding.activate(mesh):
    model, tx = transformer.build_model(c, mesh), optimizer.make_optimizer(c)
    _, shardings, init = ts.state_shardings(model, c, tx, mesh)
    state = ts.init_state(c, tx, shardings, init)
    train_fn = ts.jit_train_step(ts.make_train_step(model, c, tx, mesh), shardings, mesh)
    lines = []
    compiled = memory_plan.before_training(c, mesh, train_fn, state, lines.append)
  return c, mesh, state, compiled, lines


@pytest.mark.slow
def test_hook_prints_the_plan_and_returns_the_compiled_step(hooked):
  c, mesh, state, compiled, lines = hooked
  text = "\n".join(lines)
  assert "memory per device" in text and "(fits)" in text and "x ideal" in text, text
  rows = np.random.default_rng(0).integers(1, 100, (c.global_batch, c.data.seq_len), dtype=np.int32)
  batch = jax.device_put({k: rows for k in ts.BATCH_KEYS}, sharding.batch_sharding(mesh))
  _, m = compiled(state, batch)                 # the loop calls the compiled step as it is
  assert np.isfinite(float(m["loss"]))
  c2 = c.copy_and_resolve_references()
  c2.plan = "auto"                              # CPU: no extra lowering for tiny runs
  assert memory_plan.before_training(c2, mesh, "jitted", state, lines.append) == "jitted"


@pytest.mark.slow
def test_memory_and_flops_match_hand_counts_and_a_real_compile(hooked):
  c, mesh, state, compiled, _ = hooked
  p = memory_plan.make_plan(c, mesh, compiled)
  # arguments per device = params + Adam mu + nu (fp32, sharded 4 ways) + the 6 batch arrays
  n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(state["params"]))
  want = 3 * 4 * n_params / DEVICES + 6 * 4 * c.global_batch * c.data.seq_len / DEVICES
  assert want <= p.arguments <= want * 1.01 + 2048, (p.arguments, want)
  assert p.aliased >= 3 * 4 * n_params / DEVICES      # the donated state is updated in place
  assert p.total == p.arguments + p.outputs - p.aliased + p.temporaries and p.fits

  # FLOPs by hand: 6 x matmul params, full (unmasked) QK^T and AV, and the loss's backward
  # recompute of the chunked logits (2 H V per token); softmax/norm/Adam add a few percent.
  m = c.model
  tokens, d_attn = c.global_batch * c.data.seq_len, m.num_heads * (m.hidden_size // m.num_heads)
  hand = (6 * mx.active_params(c) + 12 * m.num_layers * c.data.seq_len * d_attn
          + 2 * m.hidden_size * m.vocab_size) * tokens
  assert 1.0 <= p.hlo_flops / hand <= 1.08, p.hlo_flops / hand
  assert p.ideal_flops == mx.flops_per_token(c) * tokens

  # the normalisation: XLA counts a loop body once (the scanned step looks cheaper); the compiled
  # per-device count x devices of the loop-free step (+ the loss recompute) = the plan's count
  assert compiled.cost_analysis()["flops"] * DEVICES < 0.8 * p.hlo_flops
  flat = c.copy_and_resolve_references()
  flat.model.scan_layers, flat.loss_chunk = False, 0
  per_device = memory_plan.lower_train_step(flat, mesh)[1].compile().cost_analysis()["flops"]
  recompute = 2 * m.hidden_size * m.vocab_size * tokens
  np.testing.assert_allclose(per_device * DEVICES + recompute, p.hlo_flops, rtol=0.02)

  p.budget = p.total - 1
  assert not p.fits and "grad_accum" in memory_plan.warning(p)


@pytest.mark.slow
def test_moe_expert_matmuls_are_counted_without_a_loop():
  """The dropless MoE's grouped matmul (a loop over row blocks) is counted as its loop-free
  einsum: hand count = 6 x the non-expert active params per token + 6 x 3 M I per sorted row,
  at the kernel's static worst case of R rows per MoE layer (one sort of the micro-batch: the
  count lowers without shard_map), + attention + recompute."""
  from apollo_jax import config as cfg
  from apollo_jax.model import dropless
  c = tiny.get_config()                                   # the last 2 of 4 layers are MoE
  c.global_batch, c.data.seq_len, c.loss_chunk, c.model.remat = 8, 64, 16, "none"
  mesh = sharding.make_mesh(c, jax.devices()[:DEVICES])
  flops = memory_plan.hlo_flops(c, mesh)
  m, e = c.model, c.moe
  M, I, K, E, b = m.hidden_size, m.intermediate_size, e.top_k, cfg.padded_num_experts(c), dropless.BLOCK_ROWS
  tokens, layers = c.global_batch * c.data.seq_len, len(cfg.moe_layer_indices(e.layers, m.num_layers))
  rows = -(-(tokens * K + E * (b - 1)) // b) * b                     # sort_plan's R
  experts = 6 * 3 * M * I * rows * layers
  dense = 6 * (mx.active_params(c) - layers * K * 3 * M * I) * tokens
  attn = 12 * m.num_layers * c.data.seq_len * m.hidden_size * tokens
  hand = dense + experts + attn + 2 * M * m.vocab_size * tokens
  assert 1.0 <= flops / hand <= 1.08, flops / hand
  assert experts > 0.25 * hand         # a large share here: without them the ratio is < 0.75


def test_parse_mesh():
  assert parse_mesh("fsdp=4,expert=2") == {"fsdp": 4, "expert": 2}
  with pytest.raises(ValueError, match="axis=size"):
    parse_mesh("fsdp:4")


@pytest.mark.slow
def test_cli_on_the_0p5b_shape():
  """The real 0.5B shapes on 2 simulated devices (short rows): arguments = 12 bytes per param / 2."""
  out = subprocess.run(
      [sys.executable, "-m", "apollo_jax.plan", "--config=configs/apollo_moe_0p5b.py", "--devices=2",
       "--mesh=fsdp=2", "--config.data.seq_len=128", "--config.global_batch=2",
       "--config.grad_accum=1", "--config.moe.group_size=128", "--config.loss_chunk=64",
       "--config.model.remat=none"],
      cwd=REPO, capture_output=True, text=True, timeout=600,
      env={**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr[-3000:]
  text = out.stdout
  assert "2 devices, mesh {'data': 1, 'fsdp': 2, 'expert': 1, 'tensor': 1}" in text, text
  args = float(re.search(r"arguments ([\d.]+) GB", text).group(1))
  np.testing.assert_allclose(args, 12 * 650_938_496 / 2 / 1e9, rtol=0.01)     # released 0.5B total
  ratio = float(re.search(r"-> ([\d.]+) x ideal", text).group(1))
  assert 1.0 < ratio < 1.6, text
  assert "(fits)" in text


@pytest.mark.slow
def test_fsdp_weights_are_all_gathered_in_bf16(tmp_path):
  """bf16 compute: every FSDP weight is gathered as bf16, except the fp32 MoE routers. Read
  after SPMD partitioning (XLA:CPU later widens bf16 collectives to f32; GPU/TPU do not)."""
  c = tiny.get_config("moe_layers=last:1")
  c.model.dtype, c.model.tie_embeddings, c.model.vocab_size, c.model.num_layers = "bfloat16", False, 512, 3
  c.moe.expert_multiple, c.moe.group_size = 8, 32
  c.global_batch, c.data.seq_len = 8, 32
  mesh = sharding.make_mesh(c)                      # fsdp = 8
  _, lowered = memory_plan.lower_train_step(c, mesh)
  with sharding.activate(mesh):
    lowered.compile({"xla_dump_to": str(tmp_path), "xla_dump_hlo_pass_re": "spmd-partitioning"})
  hlo = open(glob.glob(str(tmp_path / "*train_step*after_spmd-partitioning*"))[0]).read()
  gathers = re.findall(r"= (\w+)\[([\d,]*)\]\S* all-gather\(", hlo)
  params = transformer.abstract_params(c)
  weights = {}
  for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    name = jax.tree_util.keystr(path)
    shape = x.shape[1:] if name.startswith("['layers_0']") else x.shape    # layers 0-1: scanned
    if len(shape) >= 2:
      weights[tuple(shape)] = "router" if "['gate']" in name else "weight"
  seen = {}
  for dtype, dims in gathers:
    kind = weights.get(tuple(int(d) for d in dims.split(",") if d))
    if kind:
      seen.setdefault(kind, set()).add(dtype)
  assert seen["weight"] == {"bf16"}, seen
  assert seen["router"] == {"f32"}
  assert len([g for g in gathers if g[0] == "bf16"]) >= 15
