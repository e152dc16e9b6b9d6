"""HF checkpoint dir -> Orbax params dir for `--config.init_from`, optionally upcycled to Post-MoE.

  python -m apollo_jax.convert_from_hf --hf_dir=Qwen2-0.5B --out=ckpt/qwen2_0p5b
  python -m apollo_jax.convert_from_hf --hf_dir=Qwen2-0.5B --out=ckpt/apollo_moe_0p5b_init \
      --upcycle --config=configs/apollo_moe_0p5b.py:routing=hybrid

The model shape always comes from the HF config.json; `--config` must agree with it (its dims
are checked) and contributes the MoE settings (with --upcycle) and non-shape fields such as
dtype. Writes OUT/params (Orbax) and OUT/model_config.json.
"""

from absl import flags, logging
from ml_collections import config_flags

from apollo_jax import config as cfg
from apollo_jax.runtime import cli
from apollo_jax.runtime import workdir as workdir_io
from apollo_jax.hf import config as hf_config
from apollo_jax.hf import load as hf_load
from apollo_jax.hf import upcycle as upcycle_lib

FLAGS = flags.FLAGS


def define_flags():
  """CLI flags; defined only when run as a script, so importing this module never clashes."""
  flags.DEFINE_string("hf_dir", None, "HF checkpoint dir (config.json + safetensors).")
  flags.DEFINE_string("out", None, "Output dir (OUT/params, OUT/model_config.json).")
  flags.DEFINE_bool("upcycle", False, "Upcycle a dense checkpoint into --config's MoE layers.")
  config_flags.DEFINE_config_file("config", None, "Target config (required with --upcycle).",
                                  lock_config=True)


def convert(hf_dir, out, config=None, upcycle=False):
  """Returns (config, params) after writing them to `out`."""
  import jax
  workdir_io.model_dir_kind(hf_dir, ("hf",), "--hf_dir")      # or a message saying what it is
  src = hf_config.config_from_hf(hf_config.read_hf_config(hf_dir))
  if config is not None:
    hf_config.check_same_model(src, config, f"HF checkpoint {hf_dir}", "--config")
  if upcycle:
    if config is None:
      raise ValueError("--upcycle needs --config=configs/<name>.py (it gives the MoE layout)")
    if src.moe.layers != "none":
      raise ValueError(f"--upcycle expects a dense checkpoint; {hf_dir} is already MoE "
                       f"(layers {src.moe.layers}); convert it without --upcycle")
    if cfg.moe_layer_indices(config.moe.layers, config.model.num_layers) == ():
      raise ValueError("--upcycle with config.moe.layers='none': nothing to upcycle")
    dense_cfg = hf_config.config_from_hf(hf_config.read_hf_config(hf_dir), base=config)
    cfg.validate(config)
    params = hf_load.params_from_hf(hf_load.load_hf_state(hf_dir), dense_cfg)
    params = upcycle_lib.upcycle(params, dense_cfg, config, jax.random.key(config.seed))
    target = config
  else:
    target = hf_config.config_from_hf(hf_config.read_hf_config(hf_dir), base=config)
    cfg.validate(target)
    params = hf_load.params_from_hf(hf_load.load_hf_state(hf_dir), target)
  hf_load.save_params(params, target, out)
  logging.info("wrote %s (moe.layers=%s, experts=%d)", out, target.moe.layers, target.moe.num_experts)
  return target, params


def main(argv):
  del argv
  convert(FLAGS.hf_dir, FLAGS.out, FLAGS.config, FLAGS.upcycle)


if __name__ == "__main__":
  define_flags()
  cli.run(main, required=("hf_dir", "out"))
