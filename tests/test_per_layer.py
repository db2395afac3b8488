"""Per-group clipping: each group within its bound, the whole within S."""

import math

from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_dp import tree_util
from fedjax_dp.privacy import noise
from fedjax_dp.privacy import per_layer

_floats = st.floats(-1e4, 1e4, allow_nan=False, width=32)
_clip = st.floats(1e-3, 1e3)


@settings(max_examples=30, deadline=None)
@given(w1=st.lists(_floats, min_size=1, max_size=6),
       b1=st.lists(_floats, min_size=1, max_size=3),
       w2=st.lists(_floats, min_size=1, max_size=6),
       c1=_clip, c2=_clip)
def test_each_group_within_its_clip_and_whole_within_s(w1, b1, w2, c1, c2):
  tree = {"dense1": {"w": jnp.asarray(w1, jnp.float32),
                     "b": jnp.asarray(b1, jnp.float32)},
          "dense2": {"w": jnp.asarray(w2, jnp.float32)}}
  clip_norms = {"dense1": c1, "dense2": c2}
  out = per_layer.clip_per_group(tree, clip_norms)
  norms = per_layer.group_norms(out.clipped)
  assert float(norms["dense1"]) <= c1 * (1 + 1e-6)
  assert float(norms["dense2"]) <= c2 * (1 + 1e-6)
  s = math.sqrt(c1 ** 2 + c2 ** 2)
  assert float(per_layer.overall_clip_norm(clip_norms)) == pytest.approx(
      s, rel=1e-6)
  assert float(tree_util.global_l2_norm(out.clipped)) <= s * (1 + 1e-6)
  # Groups are clipped independently: a group within its bound is untouched.
  n1 = np.linalg.norm(np.float32(w1 + b1).astype(np.float64))
  if n1 <= c1 * (1 - 1e-6):
    # atol: XLA on CPU flushes float32 subnormals to zero.
    np.testing.assert_allclose(out.clipped["dense1"]["w"],
                               tree["dense1"]["w"], rtol=1e-6, atol=1e-37)
    assert not bool(out.was_clipped["dense1"])
  assert float(out.norms["dense1"]) == pytest.approx(n1, rel=1e-5, abs=1e-6)


def test_custom_grouping_and_missing_group():
  tree = {"a": {"w": jnp.full((4,), 3.0), "b": jnp.full((4,), 4.0)}}
  by_leaf = lambda path: "/".join(per_layer._key_name(k) for k in path)
  assert per_layer.group_names(tree, by_leaf) == ("a/b", "a/w")
  out = per_layer.clip_per_group(tree, {"a/w": 1.0, "a/b": 2.0}, by_leaf)
  assert float(jnp.linalg.norm(out.clipped["a"]["w"])) == pytest.approx(1.0)
  assert float(jnp.linalg.norm(out.clipped["a"]["b"])) == pytest.approx(2.0)
  with pytest.raises(KeyError, match="no clip norm"):
    per_layer.clip_per_group(tree, {"a/w": 1.0}, by_leaf)


def test_group_clip_norms_keep_the_whole_bound():
  assert float(per_layer.overall_clip_norm(
      {"x": 3.0, "y": 4.0})) == pytest.approx(5.0)
  u = per_layer.uniform_clip_norms(2.0, ("x", "y", "z", "w"))
  assert float(per_layer.overall_clip_norm(u)) == pytest.approx(2.0)
  tree = {"x": jnp.zeros((3, 3)), "y": jnp.zeros((7,))}
  p = per_layer.size_proportional_clip_norms(2.0, tree)
  assert float(per_layer.overall_clip_norm(p)) == pytest.approx(2.0)
  assert p["x"] / p["y"] == pytest.approx(math.sqrt(9 / 7))


def test_infinite_clips_and_zero_noise_reproduce_plain_sum():
  tree = {"x": jnp.arange(3.0), "y": jnp.ones((2, 2))}
  c = {"x": jnp.inf, "y": jnp.inf}
  out = per_layer.clip_per_group(tree, c)
  np.testing.assert_array_equal(out.clipped["x"], tree["x"])
  noisy = noise.add_gaussian_noise(
      out.clipped, noise.noise_stddev(0.0, per_layer.overall_clip_norm(c)),
                                   jax.random.key(0))
  np.testing.assert_array_equal(noisy["y"], tree["y"])


def test_jittable_with_traced_clip_norms():
  tree = {"x": jnp.full((10,), 2.0), "y": jnp.full((5,), -1.0)}
  fn = jax.jit(lambda t, c: per_layer.clip_per_group(t, c).clipped)
  out = fn(tree, {"x": jnp.float32(1.0), "y": jnp.float32(0.5)})
  assert float(jnp.linalg.norm(out["x"])) == pytest.approx(1.0, rel=1e-6)
  assert float(jnp.linalg.norm(out["y"])) == pytest.approx(0.5, rel=1e-6)
