"""Convolution and pooling whose gradients XLA:CPU runs fast inside loops.

Why this exists: a DP-FedAvg round trains clients inside loop constructs
(`lax.scan` over chunks of clients, over local steps). XLA:CPU runs the
*weight gradient* that autodiff emits for a convolution about 30-65x slower
inside a loop than outside one (docs/benchmarks.md): autodiff writes it as a
convolution whose batch and feature dimensions are swapped, and inside a
`while` body the compiler keeps that non-canonical layout and falls back to a
slow generic kernel. `conv_general_dilated` below computes exactly the same
convolution but with a custom VJP that states both gradients as ordinary
NHWC x HWIO convolutions (with explicit transposes around them), which run on
the fast kernel everywhere (docs/benchmarks.md, "Which shape won, and why").

`max_pool_2x2` is 2x2/stride-2 max pooling as a reshape and a max. Its
gradient is elementwise (autodiff of `max`), where `reduce_window`'s
gradient is XLA's `select-and-scatter`, which is slow on CPU
(docs/benchmarks.md). The forward values are identical; at ties (several window
entries equal to the maximum) the gradient is shared equally among them
instead of going to one entry, another valid subgradient. After a ReLU, ties
at zero get zero gradient either way.

Both are pure functions of their inputs: they only reorganise arithmetic and
change nothing about clipping, noise or privacy.
"""

import functools
from typing import Sequence

import jax
from jax import lax
import jax.numpy as jnp

# The only layout the fast path takes: NHWC inputs and outputs, HWIO kernels.
_NHWC = ("NHWC", "HWIO", "NHWC")


def _conv(x, kernel, pads, precision):
  return lax.conv_general_dilated(
      x, kernel, (1, 1), pads, dimension_numbers=_NHWC, precision=precision)


def _input_gradient(dy, kernel, pads, precision):
  # Correlating the output gradient with the spatially flipped kernel (in/out
  # channels swapped) over the complementary padding gives the input gradient
  # of a stride-1 convolution.
  kh, kw = kernel.shape[:2]
  flipped = jnp.transpose(kernel[::-1, ::-1], (0, 1, 3, 2))
  (top, bottom), (left, right) = pads
  return _conv(dy, flipped,
               ((kh - 1 - top, kh - 1 - bottom),
                (kw - 1 - left, kw - 1 - right)), precision)


def _kernel_gradient(x, dy, pads, precision):
  # dK[i, j, ci, co] = sum_{n, h, w} xpad[n, h + i, w + j, ci] dy[n, h, w, co]:
  # a VALID convolution with input channels as the batch, the examples as
  # the contracted feature axis and dy as the kernel, in canonical layout.
  (top, bottom), (left, right) = pads
  padded = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
  out = lax.conv_general_dilated(
      jnp.transpose(padded, (3, 1, 2, 0)),  # [ci, H + pads, W + pads, n]
      jnp.transpose(dy, (1, 2, 0, 3)),  # [Ho, Wo, n, co]
      (1, 1), "VALID", dimension_numbers=_NHWC, precision=precision)
  return jnp.transpose(out, (1, 2, 0, 3))  # [kh, kw, ci, co]


@functools.lru_cache(maxsize=None)
def _make_conv(pads, precision):
  """A stride-1 NHWC/HWIO convolution with the loop-friendly custom VJP."""

  @jax.custom_vjp
  def conv(x, kernel):
    return _conv(x, kernel, pads, precision)

  def forward(x, kernel):
    return _conv(x, kernel, pads, precision), (x, kernel)

  def backward(residuals, dy):
    x, kernel = residuals
    return (_input_gradient(dy, kernel, pads, precision).astype(x.dtype),
            _kernel_gradient(x, dy, pads, precision).astype(kernel.dtype))

  conv.defvjp(forward, backward)
  return conv


def _explicit_pads(padding, x_shape, kernel_shape):
  """Padding as ((top, bottom), (left, right)), or None if not plain."""
  if isinstance(padding, str):
    return tuple(lax.padtype_to_pads(x_shape[1:3], kernel_shape[:2], (1, 1),
                                     padding))
  pads = tuple(tuple(int(v) for v in p) for p in padding)
  if len(pads) != 2 or any(len(p) != 2 for p in pads):
    return None
  return pads


def conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding,
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers=None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision=None,
    preferred_element_type=None,
) -> jax.Array:
  """`lax.conv_general_dilated` with gradients that stay fast inside loops.

  Same signature and values as `lax.conv_general_dilated` (pass it as
  `flax.linen.Conv(conv_general_dilated=...)`). The fast path covers 2-D
  convolutions with NHWC inputs, HWIO kernels, stride 1, no dilation, no
  feature or batch groups and non-negative padding -- the convolutions of
  the models in this package; anything else is passed to
  `lax.conv_general_dilated` unchanged.
  """
  plain = (
      lhs.ndim == 4 and rhs.ndim == 4
      and tuple(window_strides) == (1, 1)
      and (lhs_dilation is None or tuple(lhs_dilation) == (1, 1))
      and (rhs_dilation is None or tuple(rhs_dilation) == (1, 1))
      and feature_group_count == 1 and batch_group_count == 1
      and preferred_element_type is None
      and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
      == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC))
  pads = _explicit_pads(padding, lhs.shape, rhs.shape) if plain else None
  if isinstance(precision, list):  # hashable for _make_conv's cache
    precision = tuple(precision)
  if pads is None or any(v < 0 for p in pads for v in p):
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        batch_group_count=batch_group_count, precision=precision,
        preferred_element_type=preferred_element_type)
  return _make_conv(pads, precision)(lhs, rhs)


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """Max pooling, window 2x2, stride 2, VALID, of NHWC `x` [n, h, w, c].

  Equal to `flax.linen.max_pool(x, (2, 2), (2, 2), "VALID")` (an odd last
  row or column is dropped, as VALID does); see the module docstring for the
  gradient at ties.
  """
  n, h, w, c = x.shape
  x = x[:, :h - h % 2, :w - w % 2, :]
  return jnp.max(x.reshape(n, h // 2, 2, w // 2, 2, c), axis=(2, 4))
