"""ApolloMoEBench evaluation in 50 languages (docs/original.md, Evaluation): few-shot prompts,
greedy generation with the original's answer extraction, option log-likelihoods, per-language
scores, a Table-4 report.
CLI: `python -m apollo_jax.evaluate`."""

from apollo_jax.evaluation.extract import extract_answer
from apollo_jax.evaluation.runner import evaluate

__all__ = ["extract_answer", "evaluate"]
