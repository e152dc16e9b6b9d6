"""Inference: the LM API (load a workdir / converted / HF directory, logits, score, generate, chat)
and the KV-cache decoder behind it."""

from apollo_jax.inference.lm import LM, from_params, inference_config, load  # noqa: F401
