"""What a training workdir holds for everything downstream of training (inference, export, eval).

  WORKDIR/config.json                      the full resolved config (train.py writes it at start)
  WORKDIR/tokenizer.model | tokenizer.json a copy of the training tokenizer
  WORKDIR/checkpoints/<step>/state/        Orbax train state {params, opt_state, step, rng}

so that `inference.load(WORKDIR)` needs nothing else.
"""

import json
import os

import jax
import ml_collections
from etils import epath

from apollo_jax import config as cfg

CONFIG = "config.json"
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
