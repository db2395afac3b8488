"""Distributed DP: discrete Gaussian shares summed by simulated SecAgg.

Each participating client i (i = 1..n) sends one message:

    v_i = R(s * u_i) + Z_i   (int32), reduced mod 2^bits,

where u_i is the client's clipped update (L2 norm <= C; replaced by zero
before encoding where it is NaN or Inf, so the message still carries its
share), s the public scale (the quantisation step is 1 / s), R stochastic
rounding to integers (unbiased), and Z_i ~ N_Z(0, sigma_c^2)^d the client's
discrete Gaussian noise share. Slots that take no part (padding, clients
that dropped out) send nothing. Secure aggregation reveals only
sum_i v_i mod 2^bits; the server decodes it to a signed integer in
[-2^(bits-1), 2^(bits-1)) and divides by s.

Shares are sized for a public minimum number of participants n_min
(`share_stddev`: sigma_c = z C s / sqrt(n_min)), so with n >= n_min
participants the shares sum to variance n sigma_c^2 >= (z C s)^2, at least
the central mechanism's noise with multiplier z. A round with fewer than
n_min participants is aborted by the round (nothing is released), as a
secure-aggregation protocol with threshold n_min would.

The simulation keeps all arithmetic modular: messages are uint32 (two's
complement of the int32 value), summed with uint32 wrap-around, i.e. mod
2^32; since 2^bits divides 2^32 the server's view is that sum masked to its
low `bits` bits. The same 32-bit accumulator, read as int32, is the exact
integer sum as long as it stays below 2^31 in magnitude (`check_params`
guarantees that for up to the block's number of slots), which gives the
simulator an oracle for wrap-around.

Overflow is never silent. `decode` returns
  * `num_near_overflow`: coordinates whose decoded value has magnitude >=
    2^(bits-2), i.e. in the outer half of the representable range. A server
    can compute this. Any true sum in [2^(bits-2), 3 * 2^(bits-2)) in
    magnitude is flagged, whether or not it wrapped; `required_bits` picks
    `bits` so that a public bound on the true sum stays below 2^(bits-2),
    so a flag means that bound was exceeded.
  * `num_wrapped`: coordinates where the decoded value differs from the
    exact integer sum (the simulator's oracle; a real server cannot see it).
Quantisation error: |decoded / s - (sum_i u_i + sum_i Z_i / s)| < n / s per
coordinate, deterministically (each rounding moves a value by < 1; exact
for a power-of-two s, otherwise up to float32 rounding of s u, see
`check_params`); its typical size is sqrt(n) / (2 s). The final float32
division by s rounds the result to 24 significant bits.

Trust model: clients trust the secure-aggregation protocol to reveal only
the modular sum; the server is honest-but-curious and sees nothing else of
the messages. It does see who takes part (it runs the protocol with them).
No single client's share suffices: the privacy below needs the shares of at
least n_min participants. If k participants collude with the server (they
know and can subtract their shares) the remaining noise has variance
(n - k) sigma_c^2, and the guarantee is that of `ddg_rho` with n - k shares.

Why discrete Gaussian and not continuous shares: SecAgg sums integers, and a
continuous share would have to be rounded; sum_i round(u_i + N_i) is not a
Gaussian mechanism, while a sum of discrete Gaussians on integer inputs has a
known guarantee (below).

Privacy (Kairouz, Liu, Steinke 2021, "The Distributed Discrete Gaussian
Mechanism for Federated Learning with Secure Aggregation", Theorem 1 /
Proposition 14): let Z be the sum of n i.i.d. N_Z(0, sigma_c^2)^d with
sigma_c >= 1/2, and Delta in Z^d with ||Delta||_2 <= D. Then for all alpha
>= 1, D_alpha(Z + Delta || Z) <= (alpha / 2) (D / (sqrt(n) sigma_c) +
tau sqrt(d))^2 with tau = 10 sum_{k=1}^{n-1} exp(-2 pi^2 sigma_c^2 k / (k+1)),
i.e. rho-zCDP with rho = (D / (sqrt(n) sigma_c) + tau sqrt(d))^2 / 2. (The
same proposition also gives alpha D^2 / (2 n sigma_c^2) + tau d; we use the
first form, a valid bound on its own.)

Neighbouring relation: the server knows the participants, so the guarantee
is for one participant's data replaced by the empty record (zero-out,
dp_accounting's REPLACE_SPECIAL): the participant still takes part and
sends R(0) + Z_i = Z_i, so the number of shares n is the same on both sides
and the integer sum moves by ||R(s u)||_2 <= s C + sqrt(d) = D
(`integer_sensitivity`), deterministically. A replace-one guarantee follows
with 2D. Since n is not known before the round, `dp_event` takes the
largest rho over every n from n_min to the block's number of slots; no
amplification by sampling is credited (the server sees who took part). Only
the RDP accountant takes ZCDpEvent. The float32 sampler below follows
Canonne, Kamath, Steinke 2020 (Algorithm 3) with a bounded number of
trials; its deviation from the exact distribution (float32 rounding, and a
reported failure count that is 0 except with probability < 2^-64 per
coordinate) is outside this guarantee and is checked against the exact pmf
in tests.
"""

import math
from typing import NamedTuple

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np

from fedjax_dp import types
from fedjax_dp.privacy import clipping

DEFAULT_MAX_TRIALS = 64
# Magnitude bound on one accepted discrete Gaussian sample, in units of
# (sigma + 1): the acceptance probability exp(-(|y| - sigma^2/t)^2 / (2
# sigma^2)) underflows to 0 in float32 long before |y| = 20 (sigma + 1).
_NOISE_BOUND_IN_SIGMAS = 20.0
# Integers up to 2^24 are exact in float32.
_MAX_SHARE_STDDEV = 2.0 ** 24 / (_NOISE_BOUND_IN_SIGMAS + 1)


# ---------------------------------------------------------------------------
# Samplers.


def sample_discrete_laplace(key: types.PRNGKey, t: jax.Array,
                            shape) -> jax.Array:
  """Discrete Laplace with P(y) proportional to exp(-|y| / t), y in Z.

  As the difference of two i.i.d. geometrics floor(t * Exp(1)), which have
  P(G >= k) = exp(-k / t). Returned as float32 holding integers.
  """
  k1, k2 = jax.random.split(key)
  t = jnp.asarray(t, jnp.float32)
  g1 = jnp.floor(t * jax.random.exponential(k1, shape, jnp.float32))
  g2 = jnp.floor(t * jax.random.exponential(k2, shape, jnp.float32))
  return g1 - g2


def sample_discrete_gaussian(
    key: types.PRNGKey, sigma: jax.Array, shape,
    max_trials: int = DEFAULT_MAX_TRIALS,
) -> tuple[jax.Array, jax.Array]:
  """N_Z(0, sigma^2): P(y) proportional to exp(-y^2 / (2 sigma^2)), y in Z.

  Canonne, Kamath, Steinke 2020, Algorithm 3, vectorised: with t =
  floor(sigma) + 1, draw Y from the discrete Laplace of scale t and accept it
  with probability exp(-(|Y| - sigma^2 / t)^2 / (2 sigma^2)); coordinates
  not yet accepted are redrawn, up to `max_trials` rounds. For sigma >= 1/2
  a round accepts with probability > 1/2 (about 0.76 for large sigma), so a
  coordinate fails all 64 rounds with probability < 2^-64. Arithmetic is
  float32 (integers exact up to 2^24).

  Args:
    key: PRNG key.
    sigma: float32 scalar >= 0 (0 gives exact zeros), at most ~8e5.
    shape: output shape.
    max_trials: bound on the rejection rounds (static).

  Returns:
    (int32 samples, int32 number of coordinates that failed every trial;
    those hold 0).
  """
  sigma = jnp.asarray(sigma, jnp.float32)
  t = jnp.floor(sigma) + 1.0
  var = jnp.maximum(jnp.square(sigma), 1e-30)

  def cond(carry):
    i, _, _, done = carry
    return (i < max_trials) & ~jnp.all(done)

  def body(carry):
    i, key, value, done = carry
    key, k_lap, k_acc = jax.random.split(key, 3)
    y = sample_discrete_laplace(k_lap, t, shape)
    p = jnp.exp(-jnp.square(jnp.abs(y) - var / t) / (2.0 * var))
    accept = jax.random.uniform(k_acc, shape, jnp.float32) < p
    value = jnp.where(~done & accept, y, value)
    return i + 1, key, value, done | accept

  init = (jnp.zeros((), jnp.int32), key, jnp.zeros(shape, jnp.float32),
          jnp.zeros(shape, bool))
  _, _, value, done = jax.lax.while_loop(cond, body, init)
  value = jnp.where(sigma > 0, value, 0.0)
  failures = jnp.where(sigma > 0, jnp.sum(~done, dtype=jnp.int32), 0)
  return value.astype(jnp.int32), failures


def discrete_gaussian_pmf(sigma: float, support: np.ndarray) -> np.ndarray:
  """Exact pmf of N_Z(0, sigma^2) on `support` (host, float64)."""
  bound = int(math.ceil(40 * sigma)) + 1
  grid = np.arange(-bound, bound + 1)
  norm = np.exp(-grid.astype(np.float64) ** 2 / (2 * sigma ** 2)).sum()
  support = np.asarray(support, np.float64)
  return np.exp(-support ** 2 / (2 * sigma ** 2)) / norm


def stochastic_round(x: jax.Array, key: types.PRNGKey) -> jax.Array:
  """Unbiased rounding to int32: floor(x) + Bernoulli(x - floor(x)).

  |result - x| < 1 always, and E[result] = x.
  """
  x = x.astype(jnp.float32)
  f = jnp.floor(x)
  up = jax.random.uniform(key, x.shape, jnp.float32) < (x - f)
  return (f + up.astype(jnp.float32)).astype(jnp.int32)


# ---------------------------------------------------------------------------
# Client side: encode; server side: modular sum and decode.


class SecAggParams(NamedTuple):
  """Sweepable encoding parameters, as arrays."""

  scale: jax.Array  # float32 s: the quantisation step is 1 / s.
  share_stddev: jax.Array  # float32 sigma_c, per-client noise, integer units.
  bits: jax.Array  # uint32 in [2, 32]: the modulus is 2^bits.

  @classmethod
  def create(cls, *, scale, share_stddev, bits) -> "SecAggParams":
    return cls(jnp.asarray(scale, jnp.float32),
               jnp.asarray(share_stddev, jnp.float32),
               jnp.asarray(bits, jnp.uint32))


def encode(update: types.PyTree, participates: jax.Array, finite: jax.Array,
           params: SecAggParams, key: types.PRNGKey,
           max_trials: int = DEFAULT_MAX_TRIALS
           ) -> tuple[types.PyTree, jax.Array]:
  """One slot's SecAgg message: R(s u) + Z, as uint32 (mod 2^32).

  Args:
    update: the client's clipped update (float leaves).
    participates: bool scalar; a slot that takes no part (padding) sends 0
      (no update and no share).
    finite: bool scalar; where False the update is replaced by zero before
      encoding (selected, not multiplied), so the participant still sends
      its noise share and never an exact value.
    params: scale, share stddev, bits.
    key: this slot's key (e.g. fold_in(round_noise_key, slot_index)).
    max_trials: discrete Gaussian rejection rounds.

  Returns:
    (uint32 tree, int32 number of noise coordinates whose sampler failed).
  """
  leaves, treedef = jax.tree_util.tree_flatten(update)
  keys = jax.random.split(key, 2 * len(leaves))
  out, failures = [], jnp.zeros((), jnp.int32)
  for j, x in enumerate(leaves):
    x = jnp.where(finite, x.astype(jnp.float32), 0.0)
    ints = stochastic_round(params.scale * x, keys[2 * j])
    z, fail = sample_discrete_gaussian(keys[2 * j + 1], params.share_stddev,
                                       x.shape, max_trials)
    # int32 -> uint32 keeps the two's complement bits: the value mod 2^32.
    message = jax.lax.bitcast_convert_type(ints + z, jnp.uint32)
    out.append(jnp.where(participates, message, jnp.uint32(0)))
    failures = failures + jnp.where(participates, fail, 0)
  return jax.tree_util.tree_unflatten(treedef, out), failures


def modular_add(a: types.PyTree, b: types.PyTree) -> types.PyTree:
  """Adds uint32 trees mod 2^32 (uint32 arithmetic wraps)."""
  return jax.tree_util.tree_map(jnp.add, a, b)


def modular_sum(stacked: types.PyTree) -> types.PyTree:
  """Sums uint32 messages over the leading (slot) axis, mod 2^32."""
  return jax.tree_util.tree_map(
      lambda x: jnp.sum(x, axis=0, dtype=jnp.uint32), stacked)


class SecAggResult(NamedTuple):
  # Decoded sum divided by the scale (float32 tree): what the server gets.
  sum: types.PyTree
  # Coordinates with |decoded| >= 2^(bits-2) (observable by the server).
  num_near_overflow: jax.Array
  # Coordinates where the decoded value != the exact integer sum (oracle).
  num_wrapped: jax.Array


def decode(accumulated: types.PyTree, params: SecAggParams) -> SecAggResult:
  """The server's view of a mod-2^32 accumulator, decoded, and diagnostics.

  Args:
    accumulated: uint32 tree, the modular sum of all slots' messages.
    params: the same parameters the clients encoded with.

  Returns:
    SecAggResult.
  """
  bits = params.bits.astype(jnp.uint32)
  shift = jnp.uint32(32) - bits
  near, wrapped, sums = [], [], []
  leaves, treedef = jax.tree_util.tree_flatten(accumulated)
  for acc in leaves:
    # Keep the low `bits` bits (the server's mod-2^bits view) at the top of
    # a 32-bit word, then shift back arithmetically: sign-extended decode
    # into [-2^(bits-1), 2^(bits-1)).
    top = jax.lax.bitcast_convert_type(jnp.left_shift(acc, shift), jnp.int32)
    signed = jnp.right_shift(top, shift.astype(jnp.int32))
    exact = jax.lax.bitcast_convert_type(acc, jnp.int32)
    # |signed| >= 2^(bits-2)  <=>  |signed| >> (bits-2) != 0.
    quarter_shift = (bits - 2).astype(jnp.int32)
    magnitude = jnp.abs(signed.astype(jnp.float32))
    near.append(jnp.sum(magnitude >= jnp.exp2(quarter_shift.astype(
        jnp.float32)), dtype=jnp.int32))
    wrapped.append(jnp.sum(signed != exact, dtype=jnp.int32))
    sums.append(signed.astype(jnp.float32) / params.scale)
  return SecAggResult(jax.tree_util.tree_unflatten(treedef, sums),
                      sum(near, jnp.zeros((), jnp.int32)),
                      sum(wrapped, jnp.zeros((), jnp.int32)))


# ---------------------------------------------------------------------------
# Host side: calibration, checks and the DP event.


def share_stddev(noise_multiplier: float, clip_norm: float, scale: float,
                 min_shares: int) -> float:
  """sigma_c = z C s / sqrt(n_min): n >= n_min shares carry >= (z C s)^2."""
  return float(noise_multiplier) * float(clip_norm) * float(scale) / math.sqrt(
      min_shares)


def integer_sensitivity(clip_norm: float, scale: float, dim: int) -> float:
  """s C + sqrt(d): bound on ||R(s u)||_2 for ||u||_2 <= C (add/remove)."""
  return float(scale) * float(clip_norm) + math.sqrt(dim)


def required_bits(num_shares: int, clip_norm: float, scale: float,
                  share_stddev_: float, num_stddevs: float = 10.0) -> int:
  """Smallest bits whose near-overflow threshold 2^(bits-2) exceeds B.

  B = n (s C + 1) + num_stddevs sqrt(n) sigma_c is a public bound on the
  magnitude of one coordinate of the true integer sum (|u_ij| <= C for every
  coordinate; rounding adds < 1; the noise sum has std sqrt(n) sigma_c).
  With these bits a flag (`num_near_overflow` > 0) means B was exceeded.
  """
  b = num_shares * (float(scale) * float(clip_norm) + 1.0) + (
      num_stddevs * math.sqrt(num_shares) * float(share_stddev_))
  return int(math.floor(math.log2(b))) + 3


def check_params(num_shares: int, clip_norm: float, scale: float,
                 share_stddev_: float, bits: int) -> None:
  """Raises ValueError unless the simulation's arithmetic is exact enough.

  s C <= 2^22 keeps the float32 product s * u within 2^-24 s C <= 1/4 of
  the real one (exact when s is a power of two), so the quantisation bound
  holds up to that. Each message is below s C + 1 + 20 (sigma_c + 1) in
  magnitude per coordinate, so the 32-bit accumulator (the oracle) is exact
  if n times that is below 2^31.
  """
  if not float(scale) * float(clip_norm) <= 2.0 ** 22:
    raise ValueError(
        f"scale * clip_norm = {float(scale) * float(clip_norm):g} > 2^22: "
        "float32 products s * u would no longer be accurate to 1/4")
  if not 2 <= int(bits) <= 32:
    raise ValueError(f"bits must be in [2, 32], got {bits!r}")
  if not 0 <= share_stddev_ <= _MAX_SHARE_STDDEV:
    raise ValueError(f"share_stddev must be in [0, {_MAX_SHARE_STDDEV:g}], "
                     f"got {share_stddev_!r}")
  per_client = float(scale) * float(clip_norm) + 1.0 + (
      _NOISE_BOUND_IN_SIGMAS * (share_stddev_ + 1.0))
  if not num_shares * per_client < 2.0 ** 31:
    raise ValueError(
        f"{num_shares} shares of magnitude up to {per_client:g} can overflow "
        "int32; lower the scale or the clip norm")


def ddg_rho(sensitivity: float, share_stddev_: float, num_shares: int,
            dim: int) -> float:
  """rho of Kairouz et al. 2021, Theorem 1 (see the module docstring).

  Raises:
    ValueError: sigma_c < 1/2 (outside the theorem).
  """
  return float(_ddg_rhos(sensitivity, share_stddev_, num_shares, num_shares,
                         dim)[0])


def _ddg_rhos(sensitivity: float, share_stddev_: float, min_shares: int,
              max_shares: int, dim: int) -> np.ndarray:
  """ddg_rho for every number of shares n = min_shares..max_shares."""
  if not share_stddev_ >= 0.5:
    raise ValueError(
        f"share_stddev must be >= 1/2 for the distributed discrete Gaussian "
        f"bound, got {share_stddev_!r}")
  k = np.arange(1, max_shares, dtype=np.float64)
  terms = np.exp(-2.0 * math.pi ** 2 * share_stddev_ ** 2 * k / (k + 1.0))
  # tau(n) sums the first n - 1 terms.
  tau = 10.0 * np.concatenate([[0.0], np.cumsum(terms)])
  n = np.arange(min_shares, max_shares + 1)
  return 0.5 * (sensitivity / (np.sqrt(n) * share_stddev_)
                + tau[n - 1] * math.sqrt(dim)) ** 2


def dp_event(*, clip_norm: float, scale: float, share_stddev_: float,
             min_shares: int, max_shares: int,
             dim: int) -> dp_accounting.DpEvent:
  """ZCDpEvent(rho) of one distributed-discrete-Gaussian round.

  Args:
    clip_norm: C (L2, real units).
    scale: s.
    share_stddev_: sigma_c, each share's stddev in integer units.
    min_shares: n_min, the fewest participants a round releases with (it
      aborts below).
    max_shares: the most participants a round can have (the block's slots).
    dim: d, the number of model parameters.

  Returns:
    ZCDpEvent(rho) with rho the largest `ddg_rho` over n in [min_shares,
    max_shares] shares, with D = s C + sqrt(d): zero-out (REPLACE_SPECIAL)
    neighbours, one participant's data replaced by the empty record. No
    amplification by sampling is credited. Account with the RDP accountant.
  """
  if not 1 <= min_shares <= max_shares:
    raise ValueError(f"need 1 <= min_shares <= max_shares, got {min_shares}, "
                     f"{max_shares}")
  d = integer_sensitivity(clip_norm, scale, dim) * clipping.sensitivity(
      1.0, clipping.NeighbouringRelation.REPLACE_SPECIAL)
  return dp_accounting.ZCDpEvent(float(np.max(
      _ddg_rhos(d, share_stddev_, min_shares, max_shares, dim))))
