"""Tolerances for comparing two computations of the same numbers that round differently.

Two programs doing the same math in another order (8 devices vs 1, a blocked kernel vs a
reference, XLA vs torch, a KV cache vs the full forward) differ only by rounding. Each step of a
length-n sum rounds with a relative error below eps; the errors have either sign, so they add
like a random walk and the two results differ by about eps * sqrt(n) * scale, `scale` being the
size of the values (the worst case, eps * n * scale, needs every error to have the same sign).
A value at the end of a chain of computations gets one such walk per step of the chain, so
`terms` counts all the roundings that feed one compared value: in float32 the lengths of the
reductions along the path (for a decoder: network_terms); in bf16 with float32 accumulation the
number of roundings to bf16 (about one per matmul or elementwise op). `dtype` is the lower
precision of the two sides (a float32 result vs a float64 numpy reference: float32).

SAFETY covers the tail of the walk and the growth of errors through the layers. With 8 the
largest rounding difference measured in this suite uses 1/15 of the derived tolerance, while a
real bug (a wrong shard, a missing mask, a wrong expert) is off by 1e-2 of the scale or more,
far above the float32 tolerances (8 * eps * sqrt(terms): 1e-6 .. 5e-5 of the scale for one pass
through a model here, 4e-4 after 30 training steps). In bf16 (eps 2**-7) the same rule allows
10-30% of the scale after a few layers: such a check only catches gross errors.

With TOLERANCE_LOG=path, every assert_close appends "test file:line err_msg max_error atol used"
to `path`; `used` is the largest error / allowed error of the call (the margin is 1 / used).
"""

import math
import os
import sys

import ml_dtypes
import numpy as np

SAFETY = 8


def eps(dtype):
  """Spacing of `dtype` at 1: float32 2**-23, bfloat16 2**-7, float64 2**-52."""
  return float(ml_dtypes.finfo(dtype).eps)


def tolerance(dtype, scale, terms=1, safety=SAFETY):
  """assert_allclose kwargs for rounding noise of `terms` roundings on values of size `scale`."""
  e = safety * eps(dtype)
  return dict(rtol=e, atol=e * math.sqrt(terms) * float(scale))


def network_terms(layers, d_model, d_ff):
  """Roundings feeding one output of a decoder: per layer, two RMS norms and the q, k, v, o, gate
  and up projections reduce over d_model and down over d_ff; the final norm and the head over
  d_model (the attention sums over the keys are short in these tests and left out)."""
  return layers * (7 * d_model + d_ff) + 2 * d_model


def _scale(desired, scale):
  return (float(np.abs(desired).max()) if desired.size else 0.0) if scale is None else float(scale)


def violation(actual, desired, *, dtype, terms=1, scale=None, safety=SAFETY):
  """Largest |actual - desired| / allowed error: below 1 passes assert_close; a negative control
  (a deliberately broken computation) should give 100 or more."""
  actual, desired = np.asarray(actual, np.float64), np.asarray(desired, np.float64)
  tol = tolerance(dtype, _scale(desired, scale), terms, safety)
  err = np.abs(actual - desired)
  return float(np.nanmax(err / (tol["atol"] + tol["rtol"] * np.abs(desired) + 1e-300))) if err.size else 0.0


def assert_close(actual, desired, *, dtype, terms=1, scale=None, safety=SAFETY, err_msg=""):
  """np.testing.assert_allclose with tolerance(dtype, scale, terms); scale defaults to
  max|desired| (an all-zero `desired` then has to be matched exactly)."""
  actual, desired = np.asarray(actual, np.float64), np.asarray(desired, np.float64)
  scale = _scale(desired, scale)
  tol = tolerance(dtype, scale, terms, safety)
  max_err = float(np.nanmax(np.abs(actual - desired))) if desired.size else 0.0
  msg = (f"{err_msg} derived tolerance for {np.dtype(dtype).name}, {terms} terms, scale {scale:.3g}: "
         f"rtol {tol['rtol']:.3g}, atol {tol['atol']:.3g}; max error {max_err:.3g}").strip()
  if os.environ.get("TOLERANCE_LOG"):
    used = violation(actual, desired, dtype=dtype, terms=terms, scale=scale, safety=safety)
    caller = sys._getframe(1)
    test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
    where = f"{os.path.basename(caller.f_code.co_filename)}:{caller.f_lineno}"
    with open(os.environ["TOLERANCE_LOG"], "a") as f:
      f.write(f"{test} {where} {err_msg.replace(' ', '_') or '-'} {max_err:.3g} {tol['atol']:.3g} {used:.3g}\n")
  np.testing.assert_allclose(actual, desired, err_msg=msg, **tol)
