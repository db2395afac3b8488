"""Where the noise is added: central, distributed or local.

Each client's update u_i is clipped first (L2 norm <= C, or L1 for Laplace);
what differs is who adds the noise and so whom the guarantee protects
against.

  * central: the server adds N(0, (z C)^2) to the sum of clipped updates. Trust
    model: clients trust the server with their clipped updates; the guarantee
    protects them against everyone who sees the released model.
  * distributed: every slot of the cohort block adds a share
    N(0, (z C)^2 / n_slots) to its own clipped update, and secure aggregation
    reveals only the sum, which then carries N(0, (z C)^2): the central
    amount. Trust model: clients trust the secure-aggregation protocol to
    reveal only the sum (honest-but-curious server); no single share
    protects a client, the sum of all of them does. With `secagg_bits` set
    the simulation also runs secure aggregation's fixed-point encoding and
    modular sum, with discrete Gaussian shares
    (privacy/secure_aggregation.py); here the sum is over the reals.
  * local: every client adds N(0, (z C)^2) (or Laplace(z C)) to its own
    clipped update before it leaves the device. Trust model: nobody; each
    message is private on its own. The sum carries the noise of all the
    clients that took part, so the model is much noisier for the same z.

Privacy:
  * central and distributed (real-valued shares): the released sum is the
    central Gaussian mechanism exactly, so the sampler's own event applies
    under its own relation (add/remove-one-client for Poisson, replace-one
    for fixed-size). The number of shares is the block size, fixed and
    public, and padding slots add a share too, so the sum's noise never
    depends on how many clients were drawn. If k shares are missing
    (clients that collude with the server and subtract theirs), the
    guarantee is that of multiplier z sqrt((n - k) / n).
  * local: each message u + N(0, (z C)^2) is a Gaussian mechanism whose input
    may be replaced by any other (L2 distance <= 2C): GaussianDpEvent(z / 2)
    per round in which the client takes part, under the LOCAL relation (see
    clipping.NeighbouringRelation; accounted like add/remove, since the
    event already carries the 2C sensitivity). No amplification by sampling
    is credited: a client may take part in every round, and the guarantee
    holds against whoever sees its messages. Laplace: laplace.local_dp_event.
"""

import math

import dp_accounting
import jax
import jax.numpy as jnp

from fedjax_dp import types
from fedjax_dp.privacy import clipping
from fedjax_dp.privacy import laplace
from fedjax_dp.privacy import noise

PLACEMENTS = ("central", "distributed", "local")


def share_stddev(noise_multiplier, clip_norm, num_shares: int) -> jax.Array:
  """z C / sqrt(n): n i.i.d. shares sum to the central noise N(0, (z C)^2)."""
  return noise.noise_stddev(noise_multiplier, clip_norm) / math.sqrt(
      num_shares)


def with_gaussian_share(clipped: types.PyTree, include: jax.Array,
                        stddev: jax.Array, key: types.PRNGKey) -> types.PyTree:
  """One slot's message under distributed noise: u (or 0) + its share.

  A slot that does not contribute an update (`include` False: padding, a
  non-finite update) still adds its share, so the sum's noise does not
  depend on how many clients were drawn. The update is selected away, not
  multiplied, so NaN in it cannot leak into the sum.
  """
  update = jax.tree_util.tree_map(
      lambda x: jnp.where(include, x.astype(jnp.float32), 0.0), clipped)
  return noise.add_gaussian_noise(update, stddev, key)


def with_local_noise(clipped: types.PyTree, include: jax.Array,
                     mechanism: str, noise_multiplier, clip_norm,
                     key: types.PRNGKey) -> types.PyTree:
  """One client's message under local noise (0 for slots that do not report).

  Gaussian: u + N(0, (z C)^2) per coordinate; Laplace: u + Laplace(z C).
  """
  scale = noise.noise_stddev(noise_multiplier, clip_norm)
  if mechanism == "laplace":
    noisy = laplace.add_laplace_noise(clipped, scale, key)
  else:
    noisy = noise.add_gaussian_noise(clipped, scale, key)
  return jax.tree_util.tree_map(
      lambda x: jnp.where(include, x, 0.0), noisy)


def local_dp_event(mechanism: str,
                   noise_multiplier: float) -> dp_accounting.DpEvent:
  """Per-client event of one round of local noise (LOCAL relation).

  Gaussian: GaussianDpEvent(z C / 2C) = GaussianDpEvent(z / 2); Laplace:
  laplace.local_dp_event(z) = LaplaceDpEvent(z / 2). z = 0 is not private.
  """
  z = float(noise_multiplier)
  if not z >= 0 or math.isinf(z):
    raise ValueError(f"noise_multiplier must be finite and >= 0, got {z!r}")
  if mechanism == "laplace":
    return laplace.local_dp_event(z)
  if z == 0:
    return dp_accounting.NonPrivateDpEvent()
  sensitivity = clipping.sensitivity(1.0, clipping.NeighbouringRelation.LOCAL)
  return dp_accounting.GaussianDpEvent(z / sensitivity)
