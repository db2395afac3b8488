"""Convolutional image classifiers.

`cnn_mcmahan` is the CNN of McMahan et al. (2017), "Communication-Efficient
Learning of Deep Networks from Decentralized Data", used for (E)MNIST.
`cnn_groupnorm` is a small CIFAR-size network that normalises with GroupNorm.

Why GroupNorm and not BatchNorm: batch norm normalises each example with
statistics of the whole batch, so one example's output (and gradient) depends
on every other example in the batch; the per-example and per-client
sensitivity arguments behind clipping no longer hold. It also keeps running
averages (`batch_stats`), state that is not a parameter, is not clipped or
noised, and would leak client data if shipped to the server. GroupNorm
normalises each example over groups of its own channels, so examples stay
independent and all the model's state is in its parameters.
"""

from flax import linen as nn
import jax
import jax.numpy as jnp

from fedjax_dp import types
from fedjax_dp.models import conv_ops
from fedjax_dp.models import flax_model


def _as_images(x: jax.Array) -> jax.Array:
  """Float32 [B, H, W, C]; a [B, H, W] input gets a channel axis."""
  x = jnp.asarray(x, jnp.float32)
  if x.ndim == 3:
    x = x[..., None]
  return x


# Convolutions and pooling with gradients that XLA:CPU runs fast inside the
# round's loops (conv_ops explains why); values equal nn.Conv / nn.max_pool.
_max_pool = conv_ops.max_pool_2x2


def _conv(features: int, kernel_size: tuple[int, int]) -> nn.Conv:
  return nn.Conv(features, kernel_size, padding="SAME",
                 conv_general_dilated=conv_ops.conv_general_dilated)


class _McMahanCNN(nn.Module):
  """conv5x5(32)-pool-conv5x5(64)-pool-dense(512)-dense(C), ReLUs."""

  num_classes: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = _as_images(x)
    x = _max_pool(nn.relu(_conv(32, (5, 5))(x)))
    x = _max_pool(nn.relu(_conv(64, (5, 5))(x)))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(512)(x))
    return nn.Dense(self.num_classes)(x)


# The McMahan CNN's layers before its dense head, by parameter name, in order.
MCMAHAN_FEATURE_LAYERS = ("Conv_0", "Conv_1")


def mcmahan_features(params: types.Params, x: jax.Array) -> jax.Array:
  """The McMahan CNN up to its dense head: [B, H, W(, C)] -> [B, features].

  `params` holds (at least) `MCMAHAN_FEATURE_LAYERS`. Applies the same flax
  layers `_McMahanCNN` applies, so `Dense_1(relu(Dense_0(features)))` equals
  the model's logits; `algorithms/factored.py` trains these layers per client
  and the dense head in factored form.
  """
  x = _as_images(x)
  for name, features in zip(MCMAHAN_FEATURE_LAYERS, (32, 64)):
    conv = _conv(features, (5, 5))
    x = _max_pool(nn.relu(conv.apply({"params": params[name]}, x)))
  return x.reshape((x.shape[0], -1))


class _GroupNormCNN(nn.Module):
  """Conv blocks (conv3x3-GroupNorm-ReLU-pool), then dense-ReLU-dense."""

  num_classes: int
  channels: tuple[int, ...] = (32, 64, 128)
  num_groups: int = 8
  dense: int = 128

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = _as_images(x)
    for c in self.channels:
      x = _conv(c, (3, 3))(x)
      x = nn.GroupNorm(num_groups=self.num_groups)(x)
      x = _max_pool(nn.relu(x))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(self.dense)(x))
    return nn.Dense(self.num_classes)(x)


def _to_model(
    name: str,
    module: nn.Module,
    input_shape: tuple[int, ...],
    num_classes: int,
) -> types.Model:
  return flax_model.from_module(
      name, module, jnp.zeros((1, *input_shape), jnp.float32),
      input_shape, num_classes)


def _check_image_shape(input_shape: tuple[int, ...]) -> tuple[int, ...]:
  input_shape = tuple(int(d) for d in input_shape)
  if len(input_shape) not in (2, 3):
    raise ValueError(
        "input_shape must be (H, W) or (H, W, C) for a CNN, got"
        f" {input_shape}"
    )
  return input_shape


def cnn_mcmahan(input_shape: tuple[int, ...], num_classes: int) -> types.Model:
  """Builds the McMahan et al. (2017) CNN.

  Layers: conv 5x5, 32 channels, SAME, ReLU; max-pool 2x2 stride 2; conv 5x5,
  64 channels, SAME, ReLU; max-pool 2x2 stride 2; flatten; dense 512, ReLU;
  dense `num_classes`. For 28x28x1 inputs it has 1,663,370 parameters with 10
  classes and 1,690,046 with 62.

  Args:
    input_shape: (H, W) or (H, W, C) of one image.
    num_classes: number of output logits.

  Returns:
    A `types.Model`; `apply(params, x)` takes float `x` of shape
    [batch, H, W, C] (or [batch, H, W], read as one channel) and returns
    float32 logits [batch, num_classes].
  """
  input_shape = _check_image_shape(input_shape)
  return _to_model(
      "cnn", _McMahanCNN(num_classes=num_classes), input_shape, num_classes
  )


def cnn_groupnorm(
    input_shape: tuple[int, ...], num_classes: int
) -> types.Model:
  """Builds a small CNN with GroupNorm, sized for CIFAR-10 (32x32x3).

  Three blocks of conv 3x3 (32, 64, 128 channels, SAME) - GroupNorm (8
  groups) - ReLU - max-pool 2x2 stride 2; then flatten, dense 128, ReLU,
  dense `num_classes`. GroupNorm keeps every example's output a function of
  that example alone (see the module docstring), so per-example and
  per-client clipping bound what one example or client can change.

  Args:
    input_shape: (H, W) or (H, W, C) of one image; H and W should be at
      least 8 (three halvings).
    num_classes: number of output logits.

  Returns:
    A `types.Model`; `apply(params, x)` takes float `x` of shape
    [batch, H, W, C] (or [batch, H, W]) and returns float32 logits
    [batch, num_classes].
  """
  input_shape = _check_image_shape(input_shape)
  return _to_model(
      "cnn_groupnorm",
      _GroupNormCNN(num_classes=num_classes),
      input_shape,
      num_classes,
  )
