"""Resuming a checkpoint where the run changed: another expert padding (mesh expert axis) and
another process count (the data position)."""

import json
import re
import os

import jax
import numpy as np
import pytest

import train_fixtures as tf
from apollo_jax.training import checkpoint
from apollo_jax.training import optimizer
from apollo_jax.runtime import sharding
from apollo_jax.training import step as ts
from apollo_jax.model import transformer

_config, _flat = tf.tiny_config, tf.flat

# --------------------------------------------------------------------- resume across padding

class _Iter:
  def __init__(self, step=0):
    self.state = {"next_index": step}

  def get_state(self):
    return self.state

  def set_state(self, s):
    self.state = s


def _state(config, devices, seed):
  """(random train state on `devices` (padded experts zero), abstract state, shardings)."""
  mesh = sharding.make_mesh(config, jax.devices()[:devices])
  with sharding.activate(mesh):
    model, tx = transformer.build_model(config, mesh), optimizer.make_optimizer(config)
    abstract, shardings, _ = ts.state_shardings(model, config, tx, mesh)
  n = config.moe.num_experts
  rng = np.random.default_rng(seed)

  def fill(path, a, s):
    v = np.zeros(a.shape, a.dtype)
    if np.issubdtype(a.dtype, np.floating) and a.ndim:
      v = rng.normal(size=a.shape).astype(a.dtype)
      if any(getattr(k, "key", None) == "experts" for k in path):
        v[n:] = 0
    return jax.device_put(v, s)
  return jax.tree_util.tree_map_with_path(fill, abstract, shardings), abstract, shardings


@pytest.mark.slow
def test_resume_across_expert_padding(tmp_path):
  """8 padded experts on an expert=2 mesh -> 7 unpadded on expert=1 (fsdp=4) -> back to 8 on
  expert=4: params and optimizer moments of the 7 real experts survive every hop exactly; a
  checkpoint whose 8th expert is not zero cannot be trimmed to 7."""
  a_cfg = _config(mesh__expert=2, mesh__fsdp=-1)
  state, _, _ = _state(a_cfg, 8, 0)
  ck = checkpoint.Checkpointer(str(tmp_path), a_cfg)
  ck.save(3, state, _Iter(3))
  bad = jax.tree.map(lambda x: x, state)
  leaf = bad["params"]["layers_3"]["mlp"]["experts"]["gate_proj"]
  bad["params"]["layers_3"]["mlp"]["experts"]["gate_proj"] = leaf.at[7].set(1.0)
  ck.save(9, bad, _Iter(9))
  ck.close()
  ref = _flat(state)
  assert ref["['params']['layers_2']['mlp']['experts']['up_proj']"].shape[0] == 8

  b_cfg = _config(mesh__expert=1, mesh__fsdp=4)
  _, b_abs, b_sh = _state(b_cfg, 4, 1)
  it = _Iter()
  ck = checkpoint.Checkpointer(str(tmp_path), b_cfg)
  got = ck.restore(3, b_abs, b_sh, it)
  assert it.state == {"next_index": 3}
  flat = _flat(got)
  assert flat.keys() == ref.keys()
  n_expert_leaves = 0
  for k, v in flat.items():
    if "experts" in k:
      n_expert_leaves += 1
      assert v.shape[0] == 7, k
      np.testing.assert_array_equal(v, ref[k][:7], err_msg=k)
    else:
      np.testing.assert_array_equal(v, ref[k], err_msg=k)
  assert n_expert_leaves == 3 * 2 * 3       # {gate,up,down} x 2 MoE layers x (param, mu, nu)
  assert jax.tree.leaves(got["params"])[0].sharding.mesh.shape["fsdp"] == 4
  with pytest.raises(ValueError, match=r"layers_3.*gate_proj.*non-zero experts beyond the 7"):
    ck.restore(9, b_abs, b_sh)
  ck.save(4, got, _Iter(4))
  ck.close()

  c_cfg = _config(mesh__expert=4, mesh__fsdp=2)
  _, c_abs, c_sh = _state(c_cfg, 8, 2)
  back = _flat(checkpoint.Checkpointer(str(tmp_path), c_cfg).restore(4, c_abs, c_sh))
  for k, v in back.items():
    np.testing.assert_array_equal(v, ref[k], err_msg=k)


def test_data_position_across_process_counts(tmp_path):
  c = _config()
  state, abstract, shardings = _state(c, 1, 0)
  ck = checkpoint.Checkpointer(str(tmp_path), c)
  ck.save(5, state, _Iter(5))
  ck.close()
  data_file = [os.path.join(r, f) for r, _, fs in os.walk(tmp_path / "checkpoints" / "5" / "data")
               for f in fs if not f.startswith("_")][0]
  saved = json.load(open(data_file))
  ck = checkpoint.Checkpointer(str(tmp_path), c)
  same = json.dumps({"next_index": 5})
  for states, ok in (([same, same], True), ([same, json.dumps({"next_index": 6})], False)):
    json.dump({**saved, "process_count": 2, "states": states}, open(data_file, "w"))
    it = _Iter()
    if ok:                                 # 2 processes at the same step -> 1 process goes on
      ck.restore(5, abstract, shardings, it)
      assert it.state == {"next_index": 5}
    else:
      with pytest.raises(ValueError, match="written by 2 processes, this run has 1, and their saved"):
        ck.restore(5, abstract, shardings, it)
  json.dump(saved, open(data_file, "w"))
  c2 = _config(global_batch=16)
  with pytest.raises(ValueError, match="global_batch=8, this run has 16"):
    checkpoint.Checkpointer(str(tmp_path), c2).restore(5, abstract, shardings, _Iter())


# --------------------------------------------------------------------- saves are never skipped

def _small_state(x=1.0):
  return {"w": jax.numpy.full((4,), x, jax.numpy.float32), "step": jax.numpy.int32(0)}


def test_second_trainer_saving_an_existing_step_is_an_error(tmp_path):
  c = _config()
  first, second = checkpoint.Checkpointer(str(tmp_path), c), checkpoint.Checkpointer(str(tmp_path), c)
  first.save(3, _small_state(), _Iter(3))
  first.wait()
  with pytest.raises(checkpoint.CheckpointError, match=r"step 3 already exists .*second trainer.*last complete step 3"):
    second.save(3, _small_state(2.0), _Iter(3))
  first.close(), second.close()
  restored = checkpoint.Checkpointer(str(tmp_path), c)
  got = restored.manager.restore(3, args=checkpoint.ocp.args.Composite(
      state=checkpoint.ocp.args.StandardRestore(_small_state()), data=checkpoint.ocp.args.JsonRestore()))
  assert float(got["state"]["w"][0]) == 1.0                 # the first run's save, untouched
  restored.close()


def test_a_failed_background_save_stops_the_run_at_once(tmp_path, monkeypatch):
  ck = checkpoint.Checkpointer(str(tmp_path), _config())
  ck.save(2, _small_state(), _Iter(2))
  ck.wait()

  def disk_full():
    raise OSError(28, "No space left on device")
  monkeypatch.setattr(ck.manager, "check_for_errors", disk_full)
  with pytest.raises(checkpoint.CheckpointError, match=r"failed: OSError: .*No space left.*complete checkpoint is step 2"):
    ck.check()
  with pytest.raises(checkpoint.CheckpointError, match="No space left"):
    ck.save(4, _small_state(), _Iter(4))                   # never starts another save on top
  monkeypatch.undo()
  ck.close()


# ------------------------------------------------------------------------ integrity and fallback

def _saved_steps(tmp_path, steps=(2, 4)):
  ck = checkpoint.Checkpointer(str(tmp_path), _config())
  for s in steps:
    ck.save(s, _small_state(float(s)), _Iter(s))
    ck.wait()
  ck.close()
  return tmp_path / "checkpoints"


def _restore_latest(tmp_path):
  from jax.sharding import NamedSharding, PartitionSpec as P
  rep = NamedSharding(jax.sharding.Mesh(np.array(jax.devices()[:1]), ("d",)), P())
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), _small_state())
  ck = checkpoint.Checkpointer(str(tmp_path), _config())
  try:
    step, state = ck.restore_latest(abstract, jax.tree.map(lambda _: rep, abstract))
    return step, float(state["w"][0])
  finally:
    ck.close()


def _biggest_file(step_dir):
  return max((p for p in step_dir.rglob("*") if p.is_file() and p.name != checkpoint.INTEGRITY),
             key=lambda p: p.stat().st_size)


def _flip(path):
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0x01
  path.write_bytes(bytes(data))


DAMAGE = {   # name: (what is done to step 4, what the log says)
    "flipped_bit": (lambda d: _flip(_biggest_file(d)), "right size but other bytes"),
    "truncated": (lambda d: _biggest_file(d).write_bytes(_biggest_file(d).read_bytes()[:-7]), "bytes, .* were written"),
    "deleted_file": (lambda d: _biggest_file(d).unlink(), "file\\(s\\) missing"),
    "unsealed_and_unreadable": (lambda d: [_biggest_file(d).write_bytes(b"garbage"),
                                           (d / checkpoint.INTEGRITY).unlink()], "Orbax cannot read it"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_a_damaged_latest_step_falls_back_to_the_previous_one(case, tmp_path, caplog):
  ckpts = _saved_steps(tmp_path)
  assert (ckpts / "4" / checkpoint.INTEGRITY).exists()        # sealed after the commit
  harm, said = DAMAGE[case]
  harm(ckpts / "4")
  with caplog.at_level("WARNING"):
    assert _restore_latest(tmp_path) == (2, 2.0)               # never the damaged state
  assert re.search(f"checkpoint step 4 in .* is damaged: .*{said}.*Moved it to .*damaged_checkpoints", caplog.text)
  assert not (ckpts / "4").exists() and len(os.listdir(tmp_path / "damaged_checkpoints")) == 1   # kept


def test_an_intact_checkpoint_restores_and_none_intact_is_an_error(tmp_path):
  ckpts = _saved_steps(tmp_path)
  assert _restore_latest(tmp_path) == (4, 4.0)
  for s in ("2", "4"):
    _flip(_biggest_file(ckpts / s))
  with pytest.raises(checkpoint.CheckpointError, match=r"no intact checkpoint in .*steps \[4, 2\] are all damaged"):
    _restore_latest(tmp_path)
