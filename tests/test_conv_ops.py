"""conv_ops: the loop-friendly convolution and pooling equal lax / flax."""

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_dp.models import conv_ops
from fedjax_dp.models import registry

_NHWC = ("NHWC", "HWIO", "NHWC")


def _inputs(x_shape, k_shape, seed=0):
  kx, kk, kd = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(kx, x_shape), jax.random.normal(kk, k_shape),
          kd)


def _value_and_grads(conv, x, kernel, probe_key, **kw):
  """Output and VJPs (w.r.t. input and kernel) against a random cotangent."""
  out, vjp = jax.vjp(lambda a, b: conv(a, b, (1, 1), **kw), x, kernel)
  cotangent = jax.random.normal(probe_key, out.shape)
  return (out,) + vjp(cotangent)


def _assert_close(actual, expected):
  # float32 sums of up to a few thousand products of N(0,1) values, in a
  # different order: relative error ~1e-6, absolute ~1e-4 on values ~1e2.
  scale = float(jnp.max(jnp.abs(expected))) + 1.0
  np.testing.assert_allclose(np.asarray(actual), np.asarray(expected),
                             rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("x_shape,k_shape,padding", [
    ((3, 14, 14, 32), (5, 5, 32, 64), "SAME"),  # the CNN's second layer
    ((2, 28, 28, 1), (5, 5, 1, 32), "SAME"),  # the CNN's first layer
    ((2, 9, 7, 3), (3, 3, 3, 4), "SAME"),
    ((2, 8, 8, 3), (2, 2, 3, 5), "SAME"),  # even kernel: asymmetric padding
    ((2, 8, 9, 3), (4, 3, 3, 2), "SAME"),
    ((2, 8, 8, 3), (3, 3, 3, 4), "VALID"),
    ((2, 8, 8, 3), (3, 3, 3, 4), ((0, 2), (1, 0))),  # explicit, asymmetric
])
def test_values_and_gradients_equal_lax(x_shape, k_shape, padding):
  x, kernel, probe = _inputs(x_shape, k_shape)
  ours = _value_and_grads(conv_ops.conv_general_dilated, x, kernel, probe,
                          padding=padding, dimension_numbers=_NHWC)
  ref = _value_and_grads(lax.conv_general_dilated, x, kernel, probe,
                         padding=padding, dimension_numbers=_NHWC)
  for a, b in zip(ours, ref):
    assert a.shape == b.shape
    _assert_close(a, b)


def test_fast_path_uses_the_custom_gradient():
  # The plain case must go through the custom VJP (else the speed-up is
  # silently lost); an unsupported case must not.
  x, kernel, _ = _inputs((1, 6, 6, 2), (3, 3, 2, 2))

  def jaxpr(strides):
    return str(jax.make_jaxpr(lambda a, b: conv_ops.conv_general_dilated(
        a, b, strides, "SAME", dimension_numbers=_NHWC))(x, kernel))

  assert "custom_vjp" in jaxpr((1, 1))
  assert "custom_vjp" not in jaxpr((2, 2))


@pytest.mark.parametrize("kwargs", [
    dict(window_strides=(2, 2), padding="SAME"),
    dict(window_strides=(1, 1), padding="SAME", rhs_dilation=(2, 2)),
    dict(window_strides=(1, 1), padding=((1, 1), (1, 1)),
         lhs_dilation=(2, 1)),
    dict(window_strides=(1, 1), padding=((-1, 0), (0, 0))),
])
def test_unsupported_cases_fall_back_to_lax(kwargs):
  x, kernel, probe = _inputs((2, 8, 8, 4), (3, 3, 4, 6))
  f_ours = lambda a, b: conv_ops.conv_general_dilated(
      a, b, dimension_numbers=_NHWC, **kwargs)
  f_ref = lambda a, b: lax.conv_general_dilated(
      a, b, dimension_numbers=_NHWC, **kwargs)
  _assert_close(f_ours(x, kernel), f_ref(x, kernel))
  g_ours = jax.grad(lambda b: jnp.sum(f_ours(x, b) ** 2))(kernel)
  g_ref = jax.grad(lambda b: jnp.sum(f_ref(x, b) ** 2))(kernel)
  _assert_close(g_ours, g_ref)


def test_grouped_and_nchw_convolutions_fall_back_to_lax():
  x, kernel, _ = _inputs((2, 8, 8, 4), (3, 3, 2, 6))
  ours = conv_ops.conv_general_dilated(
      x, kernel, (1, 1), "SAME", dimension_numbers=_NHWC,
      feature_group_count=2)
  ref = lax.conv_general_dilated(
      x, kernel, (1, 1), "SAME", dimension_numbers=_NHWC,
      feature_group_count=2)
  _assert_close(ours, ref)
  x_nchw, k_oihw, _ = _inputs((2, 3, 8, 8), (4, 3, 3, 3))
  _assert_close(
      conv_ops.conv_general_dilated(x_nchw, k_oihw, (1, 1), "SAME"),
      lax.conv_general_dilated(x_nchw, k_oihw, (1, 1), "SAME"))


def test_gradients_inside_scan_and_vmap_equal_lax():
  # The round calls the model inside lax.scan (chunks, local steps) and
  # vmap (clients, examples): the custom rule must agree there too.
  xs, kernel, _ = _inputs((3, 2, 6, 6, 3), (3, 3, 3, 4))

  def loss(conv, k, x):
    return jnp.sum(jnp.tanh(conv(x, k, (1, 1), "SAME",
                                 dimension_numbers=_NHWC)))

  def scanned(conv):
    def body(total, x):
      return total + jax.grad(loss, argnums=1)(conv, kernel, x), None
    return jax.jit(lambda: jax.lax.scan(
        body, jnp.zeros_like(kernel), xs)[0])()

  def vmapped(conv):
    # Per-client kernels and inputs, as when a chunk of clients is vmapped.
    kernels = jnp.stack([kernel, 2 * kernel, -kernel])
    return jax.vmap(jax.grad(loss, argnums=(1, 2)),
                    in_axes=(None, 0, 0))(conv, kernels, xs)

  _assert_close(scanned(conv_ops.conv_general_dilated),
                scanned(lax.conv_general_dilated))
  for a, b in zip(vmapped(conv_ops.conv_general_dilated),
                  vmapped(lax.conv_general_dilated)):
    _assert_close(a, b)


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (2, 7, 9, 3), (1, 28, 28, 1)])
def test_max_pool_equals_flax(shape):
  x = jax.random.normal(jax.random.key(1), shape)
  ref = nn.max_pool(x, (2, 2), (2, 2), "VALID")
  np.testing.assert_array_equal(conv_ops.max_pool_2x2(x), ref)
  # Continuous random inputs have no ties: the gradients are equal too.
  probe = jax.random.normal(jax.random.key(2), ref.shape)
  g = jax.grad(lambda a: jnp.sum(conv_ops.max_pool_2x2(a) * probe))(x)
  g_ref = jax.grad(lambda a: jnp.sum(
      nn.max_pool(a, (2, 2), (2, 2), "VALID") * probe))(x)
  np.testing.assert_array_equal(g, g_ref)


def test_max_pool_gradient_at_ties_is_shared():
  x = jnp.ones((1, 2, 2, 1))
  g = jax.grad(lambda a: jnp.sum(conv_ops.max_pool_2x2(a)))(x)
  np.testing.assert_allclose(g, jnp.full_like(x, 0.25))


def _xent(logits, y):
  return jnp.mean(jax.nn.logsumexp(logits, -1)
                  - jnp.take_along_axis(logits, y[:, None], -1)[:, 0])


def test_mcmahan_cnn_equals_its_plain_flax_form():
  # The same network written with lax convolutions and nn.max_pool: equal
  # values and parameter gradients (random inputs: no ties in pooling).
  model = registry.get_model("cnn", (28, 28, 1), 10)
  params = model.init(jax.random.key(0))
  assert set(params) == {"Conv_0", "Conv_1", "Dense_0", "Dense_1"}
  x = jax.random.normal(jax.random.key(3), (4, 28, 28, 1))
  y = jnp.arange(4)

  def plain_apply(p, x):
    for i in range(2):
      conv = p[f"Conv_{i}"]
      x = lax.conv_general_dilated(x, conv["kernel"], (1, 1), "SAME",
                                   dimension_numbers=_NHWC) + conv["bias"]
      x = nn.max_pool(nn.relu(x), (2, 2), (2, 2), "VALID")
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
    return x @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]

  _assert_close(model.apply(params, x), plain_apply(params, x))
  g = jax.grad(lambda p: _xent(model.apply(p, x), y))(params)
  g_ref = jax.grad(lambda p: _xent(plain_apply(p, x), y))(params)
  for a, b in zip(jax.tree_util.tree_leaves(g),
                  jax.tree_util.tree_leaves(g_ref)):
    _assert_close(a, b)


def test_groupnorm_cnn_uses_the_fast_convolutions():
  model = registry.get_model("cnn_groupnorm", (16, 16, 3), 10)
  params = model.init(jax.random.key(0))
  x = jax.random.normal(jax.random.key(3), (2, 16, 16, 3))
  jaxpr = str(jax.make_jaxpr(model.apply)(params, x))
  assert jaxpr.count("custom_vjp_call") == 3
