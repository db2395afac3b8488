"""Clipping: every clipped contribution has norm <= C (property tests)."""

import math

from hypothesis import example
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import hypothesis.extra.numpy as hnp
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_dp import tree_util
from fedjax_dp.privacy import clipping

_floats = st.floats(-1e4, 1e4, allow_nan=False, width=32)


@settings(max_examples=200, deadline=None)
@given(
    a=hnp.arrays(np.float32, hnp.array_shapes(max_dims=2, max_side=5),
                 elements=_floats),
    b=hnp.arrays(np.float32, (3,), elements=_floats),
    clip=st.floats(1e-3, 1e3),
)
# A subnormal input, which XLA:CPU flushes to zero (found by CI).
@example(a=np.array([1e-45], np.float32), b=np.zeros(3, np.float32), clip=1.0)
def test_clipped_norm_at_most_clip(a, b, clip):
  tree = {"a": jnp.asarray(a), "b": {"c": jnp.asarray(b)}}
  result = clipping.clip_by_global_norm(tree, clip)
  norm = float(tree_util.global_l2_norm(result.clipped))
  assert norm <= clip * (1 + 1e-6)
  original = math.sqrt(float(np.sum(a.astype(np.float64)**2)
                             + np.sum(b.astype(np.float64)**2)))
  assert float(result.norm) == pytest.approx(original, rel=1e-5, abs=1e-6)
  if float(result.norm) <= float(np.float32(clip)):
    # Within the bound: untouched (up to the float32 scale of 1). XLA:CPU
    # flushes subnormal floats to zero, hence the absolute tolerance of the
    # smallest normal float32.
    np.testing.assert_allclose(result.clipped["a"], a, rtol=1e-6,
                               atol=np.finfo(np.float32).tiny)
    assert not bool(result.was_clipped)
  else:
    assert norm == pytest.approx(clip, rel=1e-5)
    assert bool(result.was_clipped)
    # Clipping scales, it never changes the direction.
    flat = np.concatenate([np.ravel(result.clipped["a"]),
                           np.ravel(result.clipped["b"]["c"])])
    orig = np.concatenate([a.ravel(), b.ravel()])
    np.testing.assert_allclose(flat * original / clip, orig, rtol=1e-4,
                               atol=1e-3)


def test_infinite_clip_is_identity_and_zero_update_stays_zero():
  tree = {"w": jnp.array([3.0, 4.0])}
  out = clipping.clip_by_global_norm(tree, jnp.inf)
  np.testing.assert_array_equal(out.clipped["w"], tree["w"])
  zero = clipping.clip_by_global_norm({"w": jnp.zeros(3)}, 1.0)
  np.testing.assert_array_equal(zero.clipped["w"], np.zeros(3))
  assert np.all(np.isfinite(zero.clipped["w"]))


def test_sensitivity_by_relation():
  rel = clipping.NeighbouringRelation
  assert clipping.sensitivity(1.5, rel.ADD_OR_REMOVE_ONE) == 1.5
  assert clipping.sensitivity(1.5, rel.REPLACE_ONE) == 3.0
