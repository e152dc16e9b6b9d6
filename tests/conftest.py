"""Test setup: 8 simulated CPU devices (set before jax is imported), no wandb, repo on sys.path."""

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def data(tmp_path_factory):
  """Fixture corpus + tokenizer for the end-to-end train runs (built once per worker)."""
  import train_fixtures
  return train_fixtures.shared_data(tmp_path_factory)


@pytest.fixture(scope="session")
def jit_cache(tmp_path_factory):
  """A JAX compilation cache shared by the train subprocesses of one worker."""
  import train_fixtures
  return train_fixtures.shared_jit_cache(tmp_path_factory)
