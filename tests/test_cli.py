"""runtime/cli.run: errors a user causes are one paragraph; --debug shows the traceback; bugs
keep theirs."""

import os
import subprocess
import sys

import pytest

import train_fixtures as tf
from apollo_jax.runtime import cli


def _cli(args, debug=False):
  cmd = [sys.executable, "-m"] + args + (["--debug"] if debug else [])
  return subprocess.run(cmd, cwd=tf.REPO, env=tf.env(1), capture_output=True, text=True, timeout=120)


def test_cli_error_is_one_paragraph(tmp_path):
  """The command a new user types first: one ERROR paragraph naming what is missing, no traceback."""
  cmd = [sys.executable, "-m", "apollo_jax.train", "--config=configs/apollo_moe_7b.py", f"--workdir={tmp_path}"]
  out = subprocess.run(cmd, cwd=tf.REPO, env=tf.env(1), capture_output=True, text=True, timeout=120)
  assert out.returncode == 1 and "Traceback" not in out.stderr
  lines = [x for x in out.stderr.splitlines() if x.strip() and "WARNING" not in x]
  assert len(lines) == 1 and lines[0].startswith("ERROR: this config trains a real-size model and needs: "
                                                 "(1) --config.init_from=DIR"), out.stderr
  assert "Qwen/Qwen2-7B" in lines[0]


def test_cli_guard_debug_and_bugs(capsys, monkeypatch, tmp_path):
  from absl import flags
  from apollo_jax import convert_from_hf
  if "debug" not in flags.FLAGS:
    flags.DEFINE_bool("debug", False, "")
  flags.FLAGS.mark_as_parsed()

  def convert(argv):
    convert_from_hf.convert(str(tmp_path / "none"), str(tmp_path / "out"))

  def bug(argv):
    raise KeyError("x")
  with pytest.raises(SystemExit) as e:
    cli.guard(convert)([])
  err = capsys.readouterr().err
  assert e.value.code == 1 and err.startswith(f"ERROR: --hf_dir '{tmp_path}/none' does not exist: expected an HF checkpoint dir")
  assert err.count("\n") == 1 and err.rstrip().endswith("(rerun with --debug for the traceback)")
  with pytest.raises(KeyError):            # a bug keeps its traceback
    cli.guard(bug)([])
  monkeypatch.setattr(flags.FLAGS, "debug", True)
  with pytest.raises(FileNotFoundError):   # --debug: the user error's traceback
    cli.guard(convert)([])


def test_flag_errors_are_one_paragraph(capsys):
  """Errors ml_collections raises while parsing the flags (bad config argument, unknown field)."""
  from absl import flags
  from ml_collections import config_flags
  tiny = os.path.join(tf.REPO, "configs", "tiny.py")
  for argv, want in (([f"--config={tiny}:bogus=1"], "unknown config argument 'bogus'; known: expert_map"),
                     ([f"--config={tiny}", "--config.optim.lrr=1"],
                      "unknown config field 'lrr' in --config.optim.lrr")):
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True)
    with pytest.raises(SystemExit) as e:
      cli.parse_flags(["prog"] + argv, fv)
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.startswith("ERROR: ") and err.count("\n") == 1, err
    assert want in err and "Traceback" not in err
