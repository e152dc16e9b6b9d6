"""The real train step lowers for TPU and for CUDA from this CPU machine, with the kernels `auto`
picks on each and the config's shardings (8 simulated devices): the expected custom calls are
there, each Pallas kernel runs per device (inside a shard_map), and no buffer is [S, S] per head."""

import re

import pytest

from apollo_jax import config as cfg
from apollo_jax.model import config as model_config
from apollo_jax.runtime import sharding
from apollo_jax.training import memory_plan
from configs import tiny

TARGETS = {"tpu": "tpu", "gpu": "cuda"}          # backend whose kernels are used -> lowering platform


def square_buffers(text: str, S: int) -> list:
  """Every tensor type of the lowered program whose last two dims are S x S (the [.., T, S]
  scores or mask of one head at full length)."""
  return sorted(set(re.findall(rf"tensor<(?:\d+x)*{S}x{S}x\w+>", text)))


def custom_calls(text: str) -> set:
  return set(re.findall(r"custom_call @([\w.$]+)", text))


def tiny_config(**model):
  c = tiny.get_config()
  c.data.seq_len, c.global_batch = 256, 8
  c.mesh.update(data=1, fsdp=4, expert=1, tensor=2)
  c.model.update(model)
  return c


def lowered_text(config, backend):
  mesh = sharding.make_mesh(cfg.validate(config, 8))
  model = model_config.from_config(config, mesh, backend)
  _, lowered = memory_plan.lower_train_step(config, mesh, model, TARGETS[backend])
  return lowered.as_text()


def seven_b_two_layers():
  """Apollo-MoE-7B's dimensions, mesh and batch, cut to one dense and one MoE decoder layer."""
  c = cfg.load("apollo_moe_7b")
  c.model.num_layers, c.moe.layers = 2, "last:1"
  return c


def check(text, config, backend):
  S, m, calls = config.data.seq_len, config.model, custom_calls(text)
  if backend == "tpu":     # splash (Pallas/Mosaic) per device; the MoE's ragged_dot is native
    assert "tpu_custom_call" in calls and "ragged_dot" in text, calls
    # each call sees one device's rows and heads: q [rows / (fsdp=4), heads / (tensor=2), S, D]
    # (vmapped over its rows; one row: no row dim)
    rows, heads, D = config.global_batch // config.grad_accum // 4, m.num_heads // 2, m.hidden_size // m.num_heads
    local_q = f"tensor<{f'{rows}x' if rows > 1 else ''}{heads}x{S}x{D}x"
    splash = [l for l in text.splitlines() if "tpu_custom_call" in l]
    assert splash and all(local_q in l for l in splash), (local_q, splash[0][-400:])
  else:                    # blocked attention and the blocks MoE kernel: plain XLA, no custom call
    assert not calls and "ragged_dot" not in text, calls
  assert square_buffers(text, S) == []


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_tiny_train_step_lowers_with_the_auto_kernels(backend):
  c = tiny_config()
  check(lowered_text(c, backend), c, backend)


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_7b_layers_lower_with_the_auto_kernels(backend):
  c = seven_b_two_layers()
  check(lowered_text(c, backend), c, backend)


def test_opt_in_gpu_kernel_and_the_square_buffer_check():
  """pallas_gpu lowers to a Triton call; the check above would catch xla's [S, S] scores."""
  text = lowered_text(tiny_config(attention="pallas_gpu"), "gpu")
  assert any("triton" in c for c in custom_calls(text)), custom_calls(text)
  assert square_buffers(text, 256) == []
  assert square_buffers(lowered_text(tiny_config(attention="xla"), "gpu"), 256)


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_ragged_a2a_dispatch_lowers(backend):
  """moe.dispatch=ragged_a2a on an expert axis of 2: the train step lowers with the real
  ragged_all_to_all (there and back, forward and backward), each device holding its experts."""
  c = tiny_config()
  c.mesh.update(fsdp=2, expert=2)
  c.moe.expert_multiple, c.moe.dispatch = 0, "ragged_a2a"
  text = lowered_text(c, backend)
  assert text.count("ragged_all_to_all") >= 4, custom_calls(text)
  local = 8 // 2                                   # 8 padded experts over expert=2
  assert re.search(rf"tensor<{local}x{c.model.hidden_size}x{c.model.intermediate_size}x", text)
