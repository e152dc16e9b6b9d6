"""Orbax checkpoints in WORKDIR/checkpoints: train state + data iterator position.

Layout: checkpoints/<step>/{state/ (params, opt_state, step, rng), data/ (JSON)}. Saves are async:
`save()` returns once the arrays are copied off the device, files are written in the background
under `<step>.orbax-checkpoint-tmp*` and renamed to `<step>` at commit, so a run killed mid-save
leaves the previous step as the latest complete checkpoint (Orbax ignores the uncommitted tmp dir).

The data iterator's `get_state()` is taken in the caller's thread at save time (it must match the
batches consumed so far; a background writer would read a later position), gathered from every
process and stored as JSON by process 0 under data/: {"process_count": n, "global_batch": g,
"states": [...]}. When every process saved the same position (the grain iterator's state is the
step), a run with another number of processes resumes from it; otherwise it must keep the count.

Integrity: once a step has committed, process 0 writes checkpoints/<step>/apollo_integrity.json
(size and sha256 of every file of the step) from a background thread, so training never waits
for it. `restore_latest` verifies the newest step against it; a damaged step (a file missing,
truncated or with flipped bytes, or one Orbax cannot read) is reported in one paragraph, moved
to WORKDIR/damaged_checkpoints/ (kept, never deleted) and the next older step is tried. Steps
without the file (written before it existed, or cut off between commit and seal) are restored
unverified, with a warning.

Restores go straight onto the target shardings (any mesh). A checkpoint whose experts were padded
for another expert axis (e.g. 7 real experts padded to 8 for mesh.expert=2, resumed with
mesh.expert=1 and no padding, or 7 -> 8) is read at its saved size and re-padded on device
(`repad_on_device`), params and optimizer moments alike. The workdir may be any etils/epath path
(gs://...): Orbax writes through it.
"""

import base64
import hashlib
import json
import logging
import os
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec as P


def workdir_path(workdir: str) -> epath.Path:
  """epath for a workdir: URIs (gs://bucket/run) as given, local paths made absolute."""
  return epath.Path(workdir if "://" in str(workdir) else os.path.abspath(workdir))


class DamagedCheckpoint(Exception):
  """A checkpoint step whose files cannot be restored (restore_latest falls back past it)."""


class CheckpointError(OSError):
  """A save that did not happen or failed: the run stops at once, the last good step is named
  (an OSError: cli.run prints it as one ERROR paragraph)."""


INTEGRITY = "apollo_integrity.json"


def _digest(path) -> list:
  h, size = hashlib.sha256(), 0
  with path.open("rb") as f:
    for chunk in iter(lambda: f.read(1 << 24), b""):
      h.update(chunk)
      size += len(chunk)
  return [size, h.hexdigest()]


def _files(step_dir, prefix="") -> list:
  """Relative paths of every file under step_dir but the integrity record (epath has no
  recursive glob on object stores, so this walks the directories)."""
  out = []
  for p in step_dir.iterdir():
    if p.is_dir():
      out += _files(p, f"{prefix}{p.name}/")
    elif p.name not in (INTEGRITY, INTEGRITY + ".tmp"):
      out.append(prefix + p.name)
  return sorted(out)


def seal(step_dir):
  """Writes step_dir/apollo_integrity.json: {relative file: [size, sha256]} (atomic rename)."""
  step_dir = epath.Path(step_dir)
  manifest = {name: _digest(step_dir / name) for name in _files(step_dir)}
  tmp = step_dir / (INTEGRITY + ".tmp")
  tmp.write_text(json.dumps(manifest, indent=0))
  tmp.rename(step_dir / INTEGRITY)


def damage(step_dir):
  """None if the step's files match its integrity record (or it has none: "unverified" is logged),
  else what is wrong, in words."""
  step_dir = epath.Path(step_dir)
  if not (step_dir / INTEGRITY).exists():
    logging.warning("%s has no %s (saved before integrity records, or cut off before its seal): "
                    "restoring it unverified", step_dir, INTEGRITY)
    return None
  try:
    want = json.loads((step_dir / INTEGRITY).read_text())
  except json.JSONDecodeError:
    return f"its {INTEGRITY} is not JSON"
  missing = sorted(set(want) - set(_files(step_dir)))
  if missing:
    return f"{len(missing)} file(s) missing, e.g. {missing[0]}"
  for name, (size, sha) in want.items():
    got = _digest(step_dir / name)
    if got[0] != size:
      return f"{name} has {got[0]} bytes, {size} were written"
    if got[1] != sha:
      return f"{name} has the right size but other bytes (sha256 differs: flipped bits?)"
  return None


class Checkpointer:

  def __init__(self, workdir: str, config):
    self.directory = str(workdir_path(workdir) / "checkpoints")
    self.damaged_dir = str(workdir_path(workdir) / "damaged_checkpoints")
    self.global_batch = config.global_batch
    self.unsealed, self.sealer, self.inflight = [], None, None
    options = ocp.CheckpointManagerOptions(
        max_to_keep=config.ckpt.keep, enable_async_checkpointing=config.ckpt.async_save,
        create=True, cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(epath.Path(self.directory), options=options,
                                         item_names=("state", "data"))

  def latest_step(self):
    return self.manager.latest_step()

  def all_steps(self):
    return list(self.manager.all_steps())

  def save(self, step: int, state, data_iter):
    """Starts an async save of `state` and the iterator position. A step that already exists
    (another trainer wrote it) or a save Orbax declines is a CheckpointError, never a skip."""
    self.check()
    self._join_sealer()
    if step in self.manager.all_steps() or (epath.Path(self.directory) / str(step)).exists():  # on disk now
      self.manager.reload()          # (this run stops: its own step list may be stale)
      raise CheckpointError(
          f"checkpoint step {step} already exists in {self.directory}, written by another run: is a "
          "second trainer using this workdir? This run stops without overwriting it; last complete "
          f"step {self.latest_step()}.")
    data = {"process_count": jax.process_count(), "global_batch": self.global_batch,
            "states": gather_iterator_states(data_iter)}
    try:
      started = self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data)), force=True)
    except Exception as e:  # noqa: BLE001 (the synchronous part of the write failed: same message)
      raise self._failed(e) from e
    if not started:
      raise CheckpointError(f"Orbax declined to save step {step} in {self.directory}; last complete "
                            f"step {self.latest_step()}.")
    self.inflight = step
    if jax.process_index() == 0:
      self.unsealed.append(step)

  def _seal_committed(self):
    """Seals the committed steps in a background thread (one at a time)."""
    if not self.unsealed or self.manager.is_saving_in_progress() or (self.sealer and self.sealer.is_alive()):
      return
    steps, self.unsealed = self.unsealed, []
    dirs = [epath.Path(self.directory) / str(s) for s in steps]
    self.sealer = threading.Thread(target=lambda: [seal(d) for d in dirs if d.exists()], daemon=True)
    self.sealer.start()

  def _join_sealer(self):
    if self.sealer is not None:
      self.sealer.join()
      self.sealer = None

  def restore_latest(self, abstract_state, shardings, data_iter=None):
    """(step, state) of the newest intact checkpoint (see the module doc); damaged newer ones are
    reported, moved to damaged_checkpoints/ and skipped. CheckpointError if none is intact."""
    steps = sorted(self.all_steps(), reverse=True)
    for step in steps:
      problem = damage(epath.Path(self.directory) / str(step)) if jax.process_index() == 0 else None
      if jax.process_count() > 1:          # process 0 read the files; all follow its verdict
        from jax.experimental import multihost_utils
        bad = multihost_utils.broadcast_one_to_all(np.int32(problem is not None))
        problem = problem or ("damaged (see process 0's log)" if bad else None)
      if problem is None:
        try:
          return step, self.restore(step, abstract_state, shardings, data_iter)
        except DamagedCheckpoint as e:
          problem = str(e)
      self._set_aside(step, problem)
    raise CheckpointError(f"no intact checkpoint in {self.directory}: steps {steps} are all damaged "
                          f"(moved to {self.damaged_dir}). Start a new workdir, or restore one of "
                          "them by hand from there.")

  def _set_aside(self, step, problem):
    dst = epath.Path(self.damaged_dir) / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
    logging.warning("checkpoint step %d in %s is damaged: %s. Moved it to %s (nothing is deleted) "
                    "and trying the previous step.", step, self.directory, problem, dst)
    if jax.process_index() == 0:
      dst.parent.mkdir(parents=True, exist_ok=True)
      (epath.Path(self.directory) / str(step)).rename(dst)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("apollo_jax checkpoint set aside")
    self.manager.reload()

  def check(self):
    """Raises a CheckpointError now if a background save failed (a full disk...); cheap when all
    is well, so the loop calls it every step. Also starts sealing the steps that committed."""
    try:
      self.manager.check_for_errors()
      if self.inflight is not None and not self.manager.is_saving_in_progress():
        step, self.inflight = self.inflight, None
        self.manager.wait_until_finished()       # finished: returns at once, or raises its error
        if not (epath.Path(self.directory) / str(step)).exists():   # (Orbax may only log it)
          raise RuntimeError(f"step {step} was not committed; the writer's error is logged above")
    except Exception as e:  # noqa: BLE001 (whatever the writer raised, said in one paragraph)
      raise self._failed(e) from e
    self._seal_committed()

  def _failed(self, e) -> "CheckpointError":
    self.manager.reload()
    return CheckpointError(
        f"writing a checkpoint in {self.directory} failed: {type(e).__name__}: "
        f"{str(e).splitlines()[0] if str(e) else ''}. The last complete checkpoint is step "
        f"{self.latest_step()}; fix the cause (e.g. free disk space) and rerun the same command to "
        "resume from it.")

  def restore(self, step: int, abstract_state, shardings, data_iter=None):
    """State restored onto `shardings` (any mesh); sets `data_iter` to the saved position."""
    try:
      saved = saved_num_experts(epath.Path(self.directory) / str(step) / "state")
      target = restore_target(abstract_state, shardings, saved)
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
    except Exception as e:  # noqa: BLE001 (whatever Orbax/tensorstore raise on unreadable files)
      raise DamagedCheckpoint(f"Orbax cannot read it ({type(e).__name__}: {str(e).splitlines()[0][:300]})") from e
    if data_iter is not None:
      data_iter.set_state(_decode(self._position(step, restored["data"])))
    return repad_on_device(restored["state"], abstract_state, shardings)

  def _position(self, step, data):
    """This process's saved iterator state, mapped to another process count when possible."""
    where = f"checkpoint step {step} in {self.directory}"
    if data.get("global_batch", self.global_batch) != self.global_batch:
      raise ValueError(
          f"{where} was trained with global_batch={data['global_batch']}, this run has "
          f"{self.global_batch}: the data position would shift. Resume with "
          f"--config.global_batch={data['global_batch']} or start a new workdir (with init_from).")
    states = data["states"]
    if data["process_count"] == jax.process_count():
      return states[jax.process_index()]
    if len(set(states)) == 1:          # every process was at the same step: any layout can go on
      return states[0]
    raise ValueError(
        f"{where} was written by {data['process_count']} processes, this run has "
        f"{jax.process_count()}, and their saved data positions differ (data.num_workers > 0?), so "
        "they cannot be mapped. Resume with the same number of processes (the mesh may differ), or "
        "start a new workdir with --config.init_from pointing at exported params.")

  def wait(self):
    """Blocks until every pending async save is committed (CheckpointError if one failed)."""
    self.manager.wait_until_finished()
    self.check()

  def close(self):
    self.manager.wait_until_finished()
    self._join_sealer()
    self._seal_committed()
    self._join_sealer()
    self.manager.close()


# ------------------------------------------------------------------------------ expert padding

def _is_expert_leaf(path) -> bool:
  return any(getattr(k, "key", None) == "experts" for k in path)


def saved_num_experts(state_dir):
  """Padded expert count (dim 0 of `experts` leaves) of an Orbax tree on disk; None if no MoE."""
  with ocp.StandardCheckpointer() as ckptr:
    tree = ckptr.metadata(str(state_dir)).item_metadata.tree
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if _is_expert_leaf(path) and getattr(leaf, "shape", None):
      return int(leaf.shape[0])
  return None


def restore_target(abstract, shardings, saved_experts):
  """ShapeDtypeStructs to restore onto: the target's, except expert leaves at their saved size,
  unsharded on that dim (the saved count need not divide the expert axis)."""
  def leaf(path, a, s):
    if saved_experts is None or not _is_expert_leaf(path) or a.shape[0] == saved_experts:
      return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
    spec = (None,) + tuple(s.spec)[1:]
    return jax.ShapeDtypeStruct((saved_experts,) + a.shape[1:], a.dtype,
                                sharding=NamedSharding(s.mesh, P(*spec)))
  return jax.tree_util.tree_map_with_path(leaf, abstract, shardings)


def repad_on_device(tree, abstract, shardings):
  """Zero-pad or trim expert leaves to the target's padded count, onto the target shardings (one
  jit for all of them). Only padded (all-zero) experts may be trimmed: a real expert never is."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  want, shard = jax.tree.leaves(abstract), jax.tree.leaves(shardings)
  todo = [i for i, (_, x) in enumerate(leaves) if x.shape != want[i].shape]
  if not todo:
    return tree
  sizes = tuple(want[i].shape[0] for i in todo)

  def resize(xs):
    out, dropped = [], []
    for x, n in zip(xs, sizes):
      pad = jnp.zeros((max(n - x.shape[0], 0),) + x.shape[1:], x.dtype)
      out.append(jnp.concatenate([x[:n], pad]))
      dropped.append(jnp.any(x[n:] != 0))
    return out, jnp.stack(dropped)
  rep = NamedSharding(shard[0].mesh, P())
  out, dropped = jax.jit(resize, out_shardings=([shard[i] for i in todo], rep))([leaves[i][1] for i in todo])
  for i, bad in zip(todo, np.asarray(dropped)):
    if bad:
      raise ValueError(f"{jax.tree_util.keystr(leaves[i][0])}: the checkpoint has non-zero experts beyond "
                       f"the {want[i].shape[0]} this config pads to; check config.moe.num_experts")
  new = [x for _, x in leaves]
  for i, y in zip(todo, out):
    new[i] = y
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(tree), new)


def restore_onto(params_dir, abstract, shardings):
  """A StandardCheckpointer tree (e.g. convert_from_hf's OUT/params) restored onto `shardings`,
  experts re-padded to this mesh."""
  target = restore_target(abstract, shardings, saved_num_experts(params_dir))
  with ocp.StandardCheckpointer() as ckptr:
    tree = ckptr.restore(str(params_dir), target)
  return repad_on_device(tree, abstract, shardings)


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
