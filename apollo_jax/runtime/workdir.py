"""What a training workdir holds for everything downstream of training (inference, export, eval).

  WORKDIR/config.json                      the full resolved config (train.py writes it at start)
  WORKDIR/tokenizer.model | tokenizer.json a copy of the training tokenizer
  WORKDIR/checkpoints/<step>/state/        Orbax train state {params, opt_state, step, rng}
  WORKDIR/metrics.jsonl                    one JSON record per logged step, appended (read_metrics)
  WORKDIR/train.lock                       the running trainer: host, pid, start (TrainerLock)

so that `inference.load(WORKDIR)` needs nothing else.
"""

import json
import logging
import os
import socket
import time

import jax
import ml_collections
from etils import epath

from apollo_jax import config as cfg

CONFIG = "config.json"
METRICS = "metrics.jsonl"
TOKENIZER_NAMES = ("tokenizer.model", "tokenizer.json")


def write_config(config, workdir: str):
  """WORKDIR/config.json and a copy of the tokenizer file (process 0 only; any etils path, e.g. gs://)."""
  if jax.process_index() != 0:
    return
  out = epath.Path(workdir)
  out.mkdir(parents=True, exist_ok=True)
  tmp = out / (CONFIG + ".tmp")
  tmp.write_text(json.dumps(config.to_dict(), indent=2) + "\n")
  tmp.replace(out / CONFIG)
  tok = config.data.tokenizer
  if tok and os.path.isdir(tok):
    tok = os.path.join(tok, "tokenizer.json")
  if tok and os.path.isfile(tok):
    dst = out / ("tokenizer.model" if tok.endswith(".model") else "tokenizer.json")
    if os.path.abspath(tok) != os.path.abspath(str(dst)):
      dst.write_bytes(epath.Path(tok).read_bytes())


class WorkdirLocked(OSError):
  """Another trainer holds the workdir (an OSError: cli.run prints it as one ERROR paragraph)."""


class TrainerLock:
  """One trainer per workdir, held by process 0 for the whole run.

  A local or NFS workdir: an fcntl lock on WORKDIR/train.lock, whose text names the holder. The
  kernel drops the lock when the holder dies, however it dies, so a stale lock needs no cleanup
  (NFS: the server releases it when the client's lease ends). An object store (gs://) cannot
  lock: train.lock is a lease that the holder renews (`renew()`, at most every LEASE_S / 4), and
  one older than LEASE_S is taken over with a warning; two trainers started within the same
  second on gs:// are not told apart."""

  NAME, LEASE_S = "train.lock", 600.0

  def __init__(self, workdir: str):
    self.path = epath.Path(workdir) / self.NAME
    self.remote = "://" in str(workdir)
    self.file, self.renewed = None, 0.0
    self.holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}

  def _refuse(self, other):
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(other.get("started", 0)))
    raise WorkdirLocked(
        f"{self.path.parent} is in use by another trainer (host {other.get('host')}, pid {other.get('pid')}, "
        f"started {when}): two trainers on one workdir overwrite each other's checkpoints. Stop that "
        "run first, or train into another --workdir.")

  def acquire(self):
    self.path.parent.mkdir(parents=True, exist_ok=True)
    if self.remote:
      if self.path.exists():
        other = json.loads(self.path.read_text() or "{}")
        if time.time() - other.get("renewed", 0) < self.LEASE_S:
          self._refuse(other)
        logging.warning("%s: taking over the expired lease of %s", self.path, other)
      self.renew(force=True)
      return self
    import fcntl
    self.file = open(str(self.path), "a+")
    try:
      fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      self.file.seek(0)
      text = self.file.read()
      self.file.close()
      self._refuse(json.loads(text) if text.strip() else {})
    self.file.seek(0)
    self.file.truncate()
    self.file.write(json.dumps(self.holder) + "\n")
    self.file.flush()
    return self

  def renew(self, force=False):
    """gs://: refresh the lease (cheap to call every step: writes at most every LEASE_S / 4)."""
    if self.remote and (force or time.time() - self.renewed > self.LEASE_S / 4):
      self.renewed = time.time()
      self.path.write_text(json.dumps({**self.holder, "renewed": self.renewed}))

  def release(self):
    if self.remote:
      if self.path.exists():
        self.path.unlink()
    elif self.file is not None:
      self.file.close()          # closing the descriptor drops the flock
      self.file = None


def parse_metrics(text: str, where: str) -> tuple:
  """(records, bytes of the intact prefix) of metrics.jsonl text. The file is only ever appended
  to: a resumed run first appends {"resume": s}, and its records replace those after step s
  (s = -1: all). A torn last line (a crash or a full disk mid-append) is dropped with a warning;
  any other bad line is an error naming the file and line."""
  records, good, pos = [], 0, 0
  lines = text.splitlines(True)
  for n, line in enumerate(lines, 1):
    pos += len(line.encode())
    if not line.strip():
      good = pos
      continue
    try:
      rec = json.loads(line)
    except json.JSONDecodeError as e:
      if n == len(lines) and not line.endswith("\n"):
        logging.warning("%s: dropped a torn last line (%d bytes, a crash or a full disk mid-write)",
                        where, len(line.encode()))
        break
      raise ValueError(f"{where}: line {n} is not JSON ({e.msg}); fix or delete that line") from None
    if "resume" in rec:
      records = [r for r in records if r.get("step", 0) <= rec["resume"]]
    else:
      records.append(rec)
    good = pos
  return records, good


def read_metrics(workdir: str) -> list:
  """The records of WORKDIR/metrics.jsonl (parse_metrics), for plots and anything else."""
  path = epath.Path(workdir) / METRICS
  if not path.exists():
    raise FileNotFoundError(f"{path} not found: --workdir must be a training workdir "
                            "(python -m apollo_jax.train --workdir=DIR writes DIR/metrics.jsonl)")
  return parse_metrics(path.read_text(), str(path))[0]


# The three kinds of model directory, and what makes one: the single classifier behind
# inference.load (--model of every command) and --config.init_from.
MODEL_DIRS = {
    "workdir": "a training workdir (config.json + checkpoints/)",
    "converted": "a convert_from_hf output dir (params/ + model_config.json)",
    "hf": "an HF checkpoint dir (config.json + model.safetensors)",
}


def model_dir_kind(path: str, allowed=tuple(MODEL_DIRS), flag: str = "model path") -> str:
  """'workdir' | 'converted' | 'hf' for `path` (local or gs://), or a FileNotFoundError that
  says what `path` holds and which of the `allowed` kinds `flag` expects."""
  expected = "expected " + " or ".join(MODEL_DIRS[k] for k in allowed)
  p = epath.Path(path)
  if not p.exists():
    raise FileNotFoundError(f"{flag} {path!r} does not exist: {expected}")
  if (p / CONFIG).exists() and (p / "checkpoints").is_dir():
    kind = "workdir"
  elif (p / "params").exists() and (p / "model_config.json").exists():
    kind = "converted"
  elif (p / CONFIG).exists():
    c = json.loads((p / CONFIG).read_text())
    if "model" in c and "moe" in c:        # our training config.json, but no checkpoints/ yet
      raise FileNotFoundError(f"{flag} {path} has a training config.json but no checkpoints/ dir: "
                              f"nothing was trained (or saved) there yet; {expected}")
    kind = "hf"
  elif (p / "checkpoints").is_dir():
    raise FileNotFoundError(f"{flag} {path}: checkpoints/ but no config.json (runs from before "
                            "config.json existed: rerun the same train command to resume, which writes it)")
  else:
    raise FileNotFoundError(f"{flag} {path} is not a model dir: {expected}")
  if kind not in allowed:
    raise FileNotFoundError(f"{flag} {path} is {MODEL_DIRS[kind]}; {expected}")
  return kind


def _merge(base, saved):
  for key, value in saved.items():
    if isinstance(value, dict) and isinstance(base.get(key), ml_collections.ConfigDict):
      _merge(base[key], value)
    else:
      try:
        base[key] = value
      except TypeError:          # e.g. an int saved for a float field
        base[key] = type(base[key])(value)


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The saved config over today's defaults (fields added since the run get their defaults)."""
  path = os.path.join(workdir, CONFIG)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{workdir}: no {CONFIG}; training writes it at start (runs from before it "
                            "existed: rerun `python -m apollo_jax.train` with the same --config and "
                            "--workdir, which resumes and writes it)")
  with open(path) as f:
    saved = json.load(f)
  if not isinstance(saved, dict) or "model" not in saved or "moe" not in saved:
    raise ValueError(f"{path} is not an apollo_jax training config (no 'model'/'moe' sections)")
  c = cfg.base_config()
  _merge(c, saved)
  return c


def tokenizer_path(workdir: str, config):
  """The workdir's tokenizer copy, else config.data.tokenizer if it still exists, else None."""
  for name in TOKENIZER_NAMES:
    path = os.path.join(workdir, name)
    if os.path.isfile(path):
      return path
  tok = config.data.tokenizer
  return tok if tok and os.path.exists(tok) else None


def checkpoint_steps(workdir: str) -> list:
  """Steps of the complete checkpoints, ascending. Orbax writes a step under
  `<step>.orbax-checkpoint-tmp*` and renames it to `<step>` only at commit (training/checkpoint.py)."""
  d = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(d):
    return []
  return sorted(int(n) for n in os.listdir(d) if n.isdigit() and os.path.isdir(os.path.join(d, n, "state")))


def restore_params(workdir: str, step, abstract_params):
  """Only the params of checkpoint `step`, onto the shardings carried by `abstract_params`
  (a tree of jax.ShapeDtypeStruct with .sharding); the optimizer state is never read."""
  import orbax.checkpoint as ocp
  path = os.path.join(os.path.abspath(workdir), "checkpoints", str(step), "state")
  item = {"params": abstract_params}
  args = ocp.args.PyTreeRestore(item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                                partial_restore=True)
  with ocp.PyTreeCheckpointer() as ckptr:
    return ckptr.restore(path, args=args)["params"]
