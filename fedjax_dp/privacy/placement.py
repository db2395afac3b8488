"""Where the noise is added: central, distributed or local.

Each client's update u_i is clipped first (L2 norm <= C, or L1 for Laplace);
what differs is who adds the noise and so whom the guarantee protects
against.

  * central: the server adds N(0, (z C)^2) to the sum of clipped updates. Trust
    model: clients trust the server with their clipped updates; the guarantee
    protects them against everyone who sees the released model.
  * distributed: every participating client adds a share N(0, (z C)^2 /
    n_min) to its own clipped update, and secure aggregation reveals only
    the sum. n_min (`min_participants`) is a public minimum number of
    participants: with n >= n_min participants the sum carries
    N(0, (n / n_min) (z C)^2), at least the central amount; with fewer the
    round is aborted (nothing is released, the model does not move), as a
    secure-aggregation protocol with threshold n_min would. Only clients
    that take part add shares -- what a deployment can do: padding slots
    and clients that dropped out add nothing. Trust model: clients trust
    the secure-aggregation protocol to reveal only the sum (honest-but-
    curious server); no single share protects a client, the sum of all of
    them does. With `secagg_bits` set the simulation also runs secure
    aggregation's fixed-point encoding and modular sum, with discrete
    Gaussian shares (privacy/secure_aggregation.py); here the sum is over
    the reals.
  * local: every client adds N(0, (z C)^2) (or Laplace(z C)) to its own
    clipped update before it leaves the device. Trust model: nobody; each
    message is private on its own. The sum carries the noise of all the
    clients that took part, so the model is much noisier for the same z.

Every message that leaves a participating client carries its noise whatever
the client's data: an update that is NaN or Inf is replaced by zero *before*
the noise is added, so such a client sends noise, never an exact value
(`message`, with the noise of the placement: local Gaussian or Laplace noise,
or a distributed share).

Privacy:
  * central: the sampler's own event applies under its own relation
    (add/remove-one-client for Poisson, replace-one for fixed-size).
  * distributed: the server runs secure aggregation with the participants,
    so it knows who took part: membership is not hidden from it and no
    amplification by sampling is credited. The guarantee is for one
    participant's data replaced by the empty record (zero-out, dp_accounting's
    REPLACE_SPECIAL; the participants are the same on both sides, so the
    number of shares is too): the sum moves by at most C and carries noise
    of std >= z C, i.e. `GaussianDpEvent(z)` per round.
    A replace-one guarantee follows with sensitivity 2C. If k participants
    collude with the server (they know and can subtract their shares), the
    guarantee is that of multiplier z sqrt((n - k) / n_min).
  * local: each message u + N(0, (z C)^2) is a Gaussian mechanism whose input
    may be replaced by any other (L2 distance <= 2C): GaussianDpEvent(z / 2)
    per round in which the client takes part, under the LOCAL relation (see
    clipping.NeighbouringRelation; accounted like add/remove, since the
    event already carries the 2C sensitivity). No amplification by sampling
    is credited: a client may take part in every round, and the guarantee
    holds against whoever sees its messages. Laplace: LaplaceDpEvent(z / 2)
    likewise (privacy/laplace.py).
"""

import jax
import jax.numpy as jnp
from scipy import stats

from fedjax_dp import types
from fedjax_dp.privacy import noise

def share_stddev(noise_multiplier, clip_norm, min_participants) -> jax.Array:
  """z C / sqrt(n_min): n >= n_min i.i.d. shares carry >= N(0, (z C)^2)."""
  return noise.noise_stddev(noise_multiplier, clip_norm) / jnp.sqrt(
      jnp.asarray(min_participants, jnp.float32))


def message(clipped: types.PyTree, participates: jax.Array,
            finite: jax.Array, add_noise) -> types.PyTree:
  """A participant's noisy message; exactly 0 for a slot that takes no part.

  The update is selected away (not multiplied) where it is not finite, and
  only then noised: a participant's message carries its noise whatever its
  data. A slot that does not take part (padding) sends nothing at all.
  """
  update = jax.tree_util.tree_map(
      lambda x: jnp.where(finite, x.astype(jnp.float32), 0.0), clipped)
  noisy = add_noise(update)
  return jax.tree_util.tree_map(
      lambda x: jnp.where(participates, x, 0.0), noisy)


def with_gaussian_share(clipped: types.PyTree, participates: jax.Array,
                        finite: jax.Array, stddev: jax.Array,
                        key: types.PRNGKey) -> types.PyTree:
  """One slot's message under distributed noise: u (0 if not finite) + its
  share N(0, stddev^2) for a participant; 0 for a slot that takes no part."""
  return message(clipped, participates, finite,
                 lambda u: noise.add_gaussian_noise(u, stddev, key))


def min_participants_for(num_candidates: int, participation_probability: float,
                         abort_probability: float) -> int:
  """The default public minimum number of participants n_min.

  The largest n with P[X < n] <= abort_probability for X ~ Binomial(
  num_candidates, participation_probability), the number of clients that
  take part in a round (at least 1): rounds then abort with at most that
  probability. Computed from public settings only.
  """
  if participation_probability >= 1.0:
    return max(1, int(num_candidates))
  n = int(stats.binom.ppf(abort_probability, int(num_candidates),
                          float(participation_probability)))
  # ppf gives the smallest k with P[X <= k] >= p, so P[X < k] < p.
  return max(1, n)
