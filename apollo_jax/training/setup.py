"""What a training run starts from: the init checkpoint, the default tokenizer, steps from epochs.

`--config.init_from=DIR` accepts
  * an Orbax params dir written by convert_from_hf (DIR/params + DIR/model_config.json): restored
    by Orbax straight onto the param shardings (each process reads only its shards);
  * an HF dense Qwen2 dir (config.json + safetensors): upcycled on the fly into the config's MoE
    layers, exactly as `convert_from_hf --upcycle` (same router seed, config.seed);
  * an HF Qwen2-MoE / released Apollo-MoE dir whose MoE layout matches the config: used as is.
HF weights are converted on the host (one float32 copy of the params per process) and then placed
shard by shard (`jax.make_array_from_callback`), so no device ever holds a full replicated copy.
Expert padding follows this run's mesh (checkpoint.repad_on_device).

The big configs (config.needs_real_setup) have no demo data and no tokenizer of their own:
`check_ready` lists, in one message, what is missing and how to get it.
"""

import json
import os

import jax
import numpy as np
from etils import epath

from apollo_jax import config as cfg
from apollo_jax.runtime import workdir as workdir_io
from apollo_jax.training import checkpoint
from apollo_jax.hf import config as hf_config
from apollo_jax.hf import load as hf_load
from apollo_jax.hf.upcycle import upcycle

SAMPLE_TOKENIZER = "data/sample/tokenizer.model"     # base_config's default: the demo's tokenizer


# What a checkpoint's shapes and data depend on: resuming with any of these changed is refused.
RESUME_FIELDS = ("model.vocab_size", "model.hidden_size", "model.intermediate_size", "model.num_layers",
                 "model.num_heads", "model.num_kv_heads", "model.head_dim", "model.tie_embeddings",
                 "moe.num_experts", "moe.shared_expert")


def _tokenizer_bytes(path):
  path = os.path.join(path, "tokenizer.json") if path and os.path.isdir(path) else path
  return epath.Path(path).read_bytes() if path and epath.Path(path).is_file() else None


def check_resume(workdir: str, config):
  """Before a resume touches anything: one paragraph naming every setting that differs from the
  run that wrote WORKDIR's checkpoints (model size, MoE layers and experts, tie, tokenizer)."""
  if not (epath.Path(workdir) / workdir_io.CONFIG).exists():
    return
  saved = workdir_io.read_config(workdir)
  get = lambda c, name: c[name.split(".")[0]][name.split(".")[1]]
  diffs = [f"{k}: checkpoint {get(saved, k)!r}, this config {get(config, k)!r}"
           for k in RESUME_FIELDS if get(saved, k) != get(config, k)]
  layers = [cfg.moe_layer_indices(c.moe.layers, c.model.num_layers) for c in (saved, config)]
  if layers[0] != layers[1]:
    diffs.append(f"moe.layers: checkpoint {saved.moe.layers!r} (layers {list(layers[0])}), this config "
                 f"{config.moe.layers!r} (layers {list(layers[1])})")
  copy = next((epath.Path(workdir) / n for n in workdir_io.TOKENIZER_NAMES
               if (epath.Path(workdir) / n).exists()), None)
  if copy is not None and _tokenizer_bytes(config.data.tokenizer) not in (None, copy.read_bytes()):
    diffs.append(f"data.tokenizer: {config.data.tokenizer} is not the tokenizer this run trained with "
                 f"(its copy: {copy})")
  if diffs:
    raise ValueError(f"cannot resume {workdir}: its checkpoints were trained with other settings; "
                     + "; ".join(diffs) + ". Resume with the checkpoint's settings (its config.json), or "
                     "start a new workdir with --config.init_from pointing at converted params.")


def init_kind(path: str) -> str:
  """'converted' (convert_from_hf output) or 'hf' (config.json + safetensors); a clear error otherwise."""
  return workdir_io.model_dir_kind(path, ("converted", "hf"), "--config.init_from")


def resolve_tokenizer(config):
  """Unset or demo tokenizer + an init_from dir with tokenizer.json -> that tokenizer.json."""
  d = config.data
  if not config.init_from or d.tokenizer not in ("", SAMPLE_TOKENIZER):
    return
  path = os.path.join(config.init_from, "tokenizer.json")
  if epath.Path(path).exists():
    _say(f"data.tokenizer: {path} (from init_from; it replaces the default {d.tokenizer or '(none)'})")
    d.tokenizer = path


def check_ready(config):
  """Raise one message listing what a big config still needs (init, tokenizer, training data)."""
  d, model = config.data, config.get("init_hint", "") or "a Qwen2 checkpoint"
  missing = []
  if not config.init_from and not config.get("allow_random_init", True):
    missing.append(
        f"--config.init_from=DIR, the checkpoint to start from: the dense HF model {model} (get it with "
        f"`hf download {model} --local-dir DIR`; it is upcycled on the fly), a Qwen2-MoE / "
        "Apollo-MoE HF dir, or a convert_from_hf output; to train from random weights on purpose, "
        "add --config.allow_random_init=True")
  if not d.tokenizer:
    missing.append(
        "the tokenizer: --config.data.tokenizer=PATH/tokenizer.json (by default the tokenizer.json of "
        f"the init_from dir{'' if not config.init_from else ', which has none'})")
  if not d.train_files:
    missing.append(
        "--config.data.train_files=FILES, the training conversations (path, glob or comma list), e.g. "
        "the ApolloMoEDataset: `hf download FreedomIntelligence/ApolloMoEDataset "
        "--repo-type dataset --local-dir DATA` then --config.data.train_files=DATA/<file>.json")
  if missing:
    raise ValueError("this config trains a real-size model and needs: " +
                     "; ".join(f"({i}) {m}" for i, m in enumerate(missing, 1)) + ".")


def prepare(config):
  """Before the data is built: default tokenizer from init_from, then check_ready."""
  if config.init_from:
    init_kind(config.init_from)
  resolve_tokenizer(config)
  check_ready(config)


# ------------------------------------------------------------------------------------------- epochs

def apply_epochs(config, data):
  """config.epochs > 0 -> config.steps = the steps covering `epochs` passes (data.steps_for_epochs).

  As the original: training stops after `epochs` passes while the cosine schedule spans
  optim.horizon (1.35) times the run. Returns the steps (None when epochs is unset)."""
  epochs = float(config.get("epochs", 0) or 0)
  if epochs <= 0:
    return None
  config.steps = data.steps_for_epochs(epochs)
  _say(f"epochs={epochs:g}: steps={config.steps} ({data.stats['rows_per_epoch']} packed rows in "
       f"the first epoch, global_batch={config.global_batch})")
  return config.steps


def _say(msg):
  if jax.process_index() == 0:
    print(msg, flush=True)


# --------------------------------------------------------------------------------------- init_from

def load_params(config, abstract_params, param_shardings):
  """init_from's params, placed on `param_shardings` (the shapes of `abstract_params`)."""
  path = config.init_from
  if init_kind(path) == "converted":
    meta = json.loads((epath.Path(path) / "model_config.json").read_text())
    hf_load.check_saved_config(meta, config)
    params_dir = str(epath.Path(path) / "params")
    return checkpoint.restore_onto(params_dir, abstract_params, param_shardings)
  host = hf_params(path, config)
  return jax.tree.map(_place, host, param_shardings)


def hf_params(path, config):
  """HF dir -> host float32 params of `config`'s model (upcycled when the dir is dense)."""
  src = hf_config.config_from_hf(hf_config.read_hf_config(path), base=config)
  hf_config.check_same_model(src, config, f"--config.init_from={path}", "this config")
  state = hf_load.load_hf_state(path)
  if not cfg.moe_layer_indices(src.moe.layers, src.model.num_layers) and \
      cfg.moe_layer_indices(config.moe.layers, config.model.num_layers):
    params = hf_load.params_from_hf(state, src)
    return upcycle(params, src, config, jax.random.key(config.seed))
  hf_load.check_saved_config({"model": src.model.to_dict(), "moe": src.moe.to_dict()}, config)
  return hf_load.params_from_hf(state, config)


def _place(x, sharding):
  x = np.asarray(x, np.float32)
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])
