"""Orbax checkpoints in WORKDIR/checkpoints: train state + data iterator position.

Layout: checkpoints/<step>/{state/ (params, opt_state, step, rng), data/ (JSON)}. Saves are async:
`save()` returns once the arrays are copied off the device, files are written in the background
under `<step>.orbax-checkpoint-tmp*` and renamed to `<step>` at commit, so a run killed mid-save
leaves the previous step as the latest complete checkpoint (JAX_NOTES e).

The data iterator's `get_state()` is taken in the caller's thread at save time (it must match the
batches consumed so far; a background writer would read a later position), gathered from every
process and stored as JSON by process 0 under data/: {"process_count": n, "states": [...]}.
"""

import base64
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath


class Checkpointer:

  def __init__(self, workdir: str, config):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=config.ckpt.keep, enable_async_checkpointing=config.ckpt.async_save,
        create=True, cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(epath.Path(self.directory), options=options,
                                         item_names=("state", "data"))

  def latest_step(self):
    return self.manager.latest_step()

  def all_steps(self):
    return list(self.manager.all_steps())

  def save(self, step: int, state, data_iter) -> bool:
    """Starts an async save of `state` and the iterator position; False if `step` exists."""
    if step in self.manager.all_steps():
      return False
    data = {"process_count": jax.process_count(), "states": gather_iterator_states(data_iter)}
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data)), force=True)

  def restore(self, step: int, abstract_state, shardings, data_iter=None):
    """State restored onto `shardings` (any mesh); sets `data_iter` to the saved position."""
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract_state, shardings)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
    if data_iter is not None:
      data = restored["data"]
      if data["process_count"] != jax.process_count():
        raise ValueError(
            f"checkpoint step {step} in {self.directory} was written by {data['process_count']} "
            f"processes, this run has {jax.process_count()}: the data position cannot be mapped. "
            "Resume with the same number of processes (the mesh may differ), or start a new workdir "
            "with --config.init_from pointing at exported params.")
      data_iter.set_state(_decode(data["states"][jax.process_index()]))
    return restored["state"]

  def wait(self):
    """Blocks until every pending async save is committed."""
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def _encode(state) -> str:
  # grain DatasetIterator states are JSON dicts; DataLoader iterators return bytes.
  if isinstance(state, bytes):
    return json.dumps({"__bytes__": base64.b64encode(state).decode()})
  return json.dumps(state)


def _decode(text: str):
  state = json.loads(text)
  if isinstance(state, dict) and set(state) == {"__bytes__"}:
    return base64.b64decode(state["__bytes__"])
  return state


def gather_iterator_states(data_iter) -> list:
  """Every process's iterator state as a JSON string, in process order (same on all processes)."""
  mine = _encode(data_iter.get_state())
  if jax.process_count() == 1:
    return [mine]
  from jax.experimental import multihost_utils
  raw = np.frombuffer(mine.encode(), np.uint8)
  lengths = np.asarray(multihost_utils.process_allgather(np.int32(raw.size))).reshape(-1)
  padded = np.zeros(int(lengths.max()), np.uint8)
  padded[:raw.size] = raw
  everything = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(lengths), -1)
  return [bytes(row[:n]).decode() for row, n in zip(everything, lengths)]
