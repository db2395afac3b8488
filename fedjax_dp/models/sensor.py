"""A small 1-D convolutional classifier of multichannel time series.

For sensor windows (accelerometers, IoT devices): x [batch, time, channels]
(or [batch, time], one channel). Two convolutions over time pick out
frequency and amplitude patterns, global average pooling over time makes the
result independent of where in the window they occur, and one dense layer
gives the logits. A few thousand parameters: the size cross-device training
on small devices (and per-client clipping, whose noise grows with the number
of parameters) calls for.

The time axis is laid out as a 1 x T image so the convolutions are
`conv_ops`' 2-D ones, whose gradients stay fast inside the round's loops on
CPU; a (1, k) kernel over a 1 x T image is exactly a 1-D convolution. No
normalisation layer: batch norm would mix examples (see `cnn.py`), and the
model is small enough to train without one.
"""

from flax import linen as nn
import jax
import jax.numpy as jnp

from fedjax_dp import types
from fedjax_dp.models import conv_ops
from fedjax_dp.models import flax_model


def _max_pool_time_2(x: jax.Array) -> jax.Array:
  """Max over pairs of time steps of [n, 1, t, c] (an odd last one dropped);
  a reshape and a max, like `conv_ops.max_pool_2x2`, for a fast gradient."""
  n, h, t, c = x.shape
  x = x[:, :, :t - t % 2, :]
  return jnp.max(x.reshape(n, h, t // 2, 2, c), axis=3)


class _Conv1D(nn.Module):
  """(conv1d-ReLU, with 2x max-pooling between) x len(channels), global
  average pooling over time, dense logits."""

  num_classes: int
  channels: tuple[int, ...]
  kernel_size: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.asarray(x, jnp.float32)
    if x.ndim == 2:
      x = x[..., None]
    x = x[:, None]  # [batch, 1, time, channels]
    for i, c in enumerate(self.channels):
      if i:
        x = _max_pool_time_2(x)
      x = nn.Conv(c, (1, self.kernel_size), padding="SAME",
                  conv_general_dilated=conv_ops.conv_general_dilated)(x)
      x = nn.relu(x)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes)(x)


def conv1d(
    input_shape: tuple[int, ...],
    num_classes: int,
    channels: tuple[int, ...] = (16, 32),
    kernel_size: int = 5,
) -> types.Model:
  """Builds the 1-D convolutional classifier.

  Layers: for each width in `channels`, a convolution over time (kernel
  `kernel_size`, SAME padding) and a ReLU, with 2x max-pooling over time
  between consecutive convolutions; then the mean over time and a dense
  layer to the logits. With the defaults and 3 channels in, 5 classes:
  3,013 parameters.

  Args:
    input_shape: (time,) or (time, channels) of one example.
    num_classes: number of output logits.
    channels: the convolutions' output widths, each >= 1 (at least one).
    kernel_size: the convolutions' length in time steps, >= 1.

  Returns:
    A `types.Model`; `apply(params, x)` takes float `x` of shape
    [batch, time, channels] (or [batch, time]) and returns float32 logits
    [batch, num_classes].

  Raises:
    ValueError: for an input shape that is not (time,) or (time, channels),
      or widths or a kernel size below 1.
  """
  input_shape = tuple(int(d) for d in input_shape)
  if len(input_shape) not in (1, 2):
    raise ValueError("input_shape must be (time,) or (time, channels) for "
                     f"conv1d, got {input_shape}")
  channels = tuple(int(c) for c in channels)
  if not channels or any(c < 1 for c in channels):
    raise ValueError(f"channels must be one or more integers >= 1, got "
                     f"{channels}")
  if int(kernel_size) < 1:
    raise ValueError(f"kernel_size must be an integer >= 1, got {kernel_size}")
  module = _Conv1D(num_classes=num_classes, channels=channels,
                   kernel_size=int(kernel_size))
  return flax_model.from_module(
      "conv1d", module, jnp.zeros((1, *input_shape), jnp.float32),
      input_shape, num_classes)
