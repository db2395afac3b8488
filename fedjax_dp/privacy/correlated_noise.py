"""Matrix-factorization noise (BandMF, BLT), generated one round at a time.

The matrix mechanism factors the prefix-sum workload A = B C (C lower
triangular, T x T over the rounds) and releases C x + Z, where x stacks the
rounds' clipped sums and Z has i.i.d. N(0, sigma^2) entries, sigma = z C
(z the noise multiplier, C the clip norm). The round consumes

    x_t + w_t,   w = C^{-1} Z,

so whatever the server does with the noisy sums is a post-processing of
C x + Z (x + C^{-1} Z = C^{-1} (C x + Z)). Round t's w_t depends on
z_1..z_t only; each strategy below computes it in streaming form, carrying a
few model-sized buffers from round to round (never T x d), and draws z_t
from fold_in(key, t), so the state is (key, step, buffers). The buffers
hold the noise of sigma = 1 (the strategy is linear: the round scales its
output by sigma), so the state does not depend on the noise multiplier.

Strategies (C lower-triangular Toeplitz with c_0 > 0):
  * `BandedToeplitz(coefs)`: C of b = len(coefs) bands (BandMF;
    Choquette-Choo et al. 2023, "(Amplified) Banded Matrix Factorization"):
    w_t = (z_t - sum_{j=1}^{b-1} c_j w_{t-j}) / c_0, b - 1 buffers.
  * `BufferedInverse(decay, scale)`: C^{-1} a buffered linear Toeplitz
    matrix (BLT; Dvijotham et al. 2024, McMahan et al. 2024): with one
    buffer s_i per decay theta_i, w_t = z_t + sum_i omega_i s_i, then
    s_i <- theta_i s_i + z_t.
  * DP-FTRL's binary tree (Kairouz et al. 2021) is the third strategy, in
    `tree_aggregation.TreeNoise`.

`band_mf` and `blt` build strategies optimised for the prefix-sum workload
with jax-privacy's `matrix_factorization` (computed once per setting on the
host, before round 0; the coefficients are rounded to float32, and the
sensitivity is computed from the rounded values the round uses).

Privacy: a client taking part in rounds t_1 < ... < t_m moves C x by
C (sum_i e_{t_i} g_i^T), g_i its clipped update (L2 <= C, REPLACE_SPECIAL:
replaced by the empty record; or ADD_OR_REMOVE_ONE: added or removed), so
the release is a Gaussian mechanism of L2 sensitivity C sqrt(s), with s
the largest squared norm over the participation schema
(`minsep_sensitivity_squared`: at most k rounds, any two at least b apart).
The event is GaussianDpEvent(z / sqrt(s)) (rho = s / (2 z^2) zCDP), no
amplification credited; amplified BandMF (b-banded C under b-cyclic Poisson
sampling) is accounted by the sampler (`sampling.BandedPoissonSampler`).
"""

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_dp import types


class StreamState(NamedTuple):
  """A matrix-factorization strategy's carried state."""

  key: types.PRNGKey  # z_t draws from fold_in(key, t).
  step: jax.Array  # int32: rounds done (t of the next round, 0-based).
  buffers: types.PyTree  # Each leaf [num_buffers, *leaf shape], float32.


def _standard_normal(key: types.PRNGKey, step: jax.Array,
                     template: types.PyTree):
  """z_t / sigma: i.i.d. N(0, 1) with the leaves of `template`."""
  leaves, treedef = jax.tree_util.tree_flatten(template)
  keys = jax.random.split(jax.random.fold_in(key, step), len(leaves))
  return treedef, [jax.random.normal(k, x.shape, jnp.float32)
                   for x, k in zip(leaves, keys)]


def _scaled(treedef, stddev: jax.Array, leaves) -> types.PyTree:
  return jax.tree_util.tree_unflatten(treedef, [stddev * x for x in leaves])


def _zero_buffers(template: types.PyTree, count: int) -> types.PyTree:
  return jax.tree_util.tree_map(
      lambda x: jnp.zeros((count,) + tuple(x.shape), jnp.float32), template)


def _combine(weights: jax.Array, buffer: jax.Array) -> jax.Array:
  """sum_i weights[i] buffer[i] (exact multiplies and adds, no matmul
  precision shortcuts)."""
  shaped = weights.reshape((-1,) + (1,) * (buffer.ndim - 1))
  return jnp.sum(shaped * buffer, axis=0)


class _Streaming:
  """A strategy's state: its key, step 0 and `num_buffers` zero buffers
  (each strategy says how many)."""

  def init(self, key: types.PRNGKey, template: types.PyTree) -> StreamState:
    return StreamState(key, jnp.zeros((), jnp.int32),
                       _zero_buffers(template, self.num_buffers))


@dataclasses.dataclass(frozen=True)
class BandedToeplitz(_Streaming):
  """C lower-triangular Toeplitz with Toeplitz coefficients `coefs`
  (c_0 > 0; b = len(coefs) bands)."""

  coefs: tuple[float, ...]

  def __post_init__(self):
    if not self.coefs or not self.coefs[0] > 0 or not all(
        math.isfinite(c) for c in self.coefs):
      raise ValueError(f"coefs must be finite with coefs[0] > 0, got "
                       f"{self.coefs!r}")

  @property
  def bands(self) -> int:
    return len(self.coefs)

  @property
  def num_buffers(self) -> int:
    return self.bands - 1

  def noise(self, state: StreamState, template: types.PyTree,
            stddev: jax.Array) -> tuple[types.PyTree, StreamState]:
    """(w_t of std `stddev` per z entry, next state) for the round at
    `state.step`."""
    treedef, z = _standard_normal(state.key, state.step, template)
    c0 = jnp.float32(self.coefs[0])
    if self.num_buffers == 0:
      w = [x / c0 for x in z]
      return _scaled(treedef, stddev, w), state._replace(step=state.step + 1)
    # A ring: slot s holds w_{t'} for the latest t' < t with t' = s (mod
    # b - 1), i.e. lag j = (t - s - 1) mod (b - 1) + 1; never-written slots
    # hold zeros (w_{t'} = 0 for t' < 0).
    slots = self.num_buffers
    lag = (state.step - jnp.arange(slots) - 1) % slots + 1
    weights = jnp.asarray(self.coefs, jnp.float32)[lag]
    buffers = jax.tree_util.tree_leaves(state.buffers)
    w = [(x - _combine(weights, buf)) / c0 for x, buf in zip(z, buffers)]
    written = [buf.at[state.step % slots].set(x) for buf, x in zip(buffers, w)]
    return (_scaled(treedef, stddev, w),
            StreamState(state.key, state.step + 1,
                        jax.tree_util.tree_unflatten(treedef, written)))

  def strategy_coefs(self, num_steps: int) -> np.ndarray:
    """C's Toeplitz coefficients (first column), float64, length T."""
    c = np.zeros(num_steps)
    n = min(num_steps, self.bands)
    c[:n] = np.asarray(self.coefs[:n], np.float64)
    return c

  def noise_coefs(self, num_steps: int) -> np.ndarray:
    """C^{-1}'s Toeplitz coefficients, float64, length T."""
    return toeplitz_inverse(self.strategy_coefs(num_steps))


@dataclasses.dataclass(frozen=True)
class BufferedInverse(_Streaming):
  """C whose inverse is the BLT of buffer decays theta_i and output scales
  omega_i: C^{-1}'s Toeplitz coefficients are 1, then
  sum_i omega_i theta_i^(k-1) for k >= 1."""

  decay: tuple[float, ...]
  scale: tuple[float, ...]

  def __post_init__(self):
    if len(self.decay) != len(self.scale) or not all(
        math.isfinite(x) for x in self.decay + self.scale):
      raise ValueError("decay and scale must be finite, of one length; got "
                       f"{self.decay!r}, {self.scale!r}")
    if not all(abs(d) <= 1 for d in self.decay):
      raise ValueError(f"decays must be in [-1, 1], got {self.decay!r}")

  @property
  def num_buffers(self) -> int:
    return len(self.decay)

  def noise(self, state: StreamState, template: types.PyTree,
            stddev: jax.Array) -> tuple[types.PyTree, StreamState]:
    """(w_t of std `stddev` per z entry, next state) for the round at
    `state.step`."""
    treedef, z = _standard_normal(state.key, state.step, template)
    decay = jnp.asarray(self.decay, jnp.float32)
    scale = jnp.asarray(self.scale, jnp.float32)
    buffers = jax.tree_util.tree_leaves(state.buffers)
    w = [x + _combine(scale, buf) for x, buf in zip(z, buffers)]
    moved = [decay.reshape((-1,) + (1,) * x.ndim) * buf + x[None]
             for x, buf in zip(z, buffers)]
    return (_scaled(treedef, stddev, w),
            StreamState(state.key, state.step + 1,
                        jax.tree_util.tree_unflatten(treedef, moved)))

  def noise_coefs(self, num_steps: int) -> np.ndarray:
    """C^{-1}'s Toeplitz coefficients, float64, length T."""
    k = np.arange(max(num_steps - 1, 0), dtype=np.float64)
    decay = np.asarray(self.decay, np.float64)[:, None]
    scale = np.asarray(self.scale, np.float64)[:, None]
    rest = np.sum(scale * decay ** k[None, :], axis=0) if self.decay else (
        np.zeros(k.shape))
    return np.concatenate([[1.0], rest])[:num_steps]

  def strategy_coefs(self, num_steps: int) -> np.ndarray:
    """C's Toeplitz coefficients (first column), float64, length T."""
    return toeplitz_inverse(self.noise_coefs(num_steps))


Strategy = BandedToeplitz | BufferedInverse


def toeplitz_inverse(coefs: np.ndarray) -> np.ndarray:
  """The Toeplitz coefficients of the inverse of the lower-triangular
  Toeplitz matrix with first column `coefs` (float64 forward substitution)."""
  c = np.asarray(coefs, np.float64)
  out = np.zeros_like(c)
  if c.size:
    out[0] = 1.0 / c[0]
  for k in range(1, c.size):
    out[k] = -np.dot(c[1:k + 1], out[k - 1::-1]) / c[0]
  return out


def toeplitz_matrix(coefs: np.ndarray) -> np.ndarray:
  """The lower-triangular Toeplitz matrix with first column `coefs`."""
  c = np.asarray(coefs, np.float64)
  n = c.size
  lag = np.arange(n)[:, None] - np.arange(n)[None, :]
  return np.where(lag >= 0, c[np.clip(lag, 0, n - 1)], 0.0)


def max_participations(num_steps: int, max_participations_: int | None,
                       min_separation: int) -> int:
  """How many rounds a client can take part in: at most k, and no more than
  fit T rounds at least b apart (ceil(T / b))."""
  fit = -(-int(num_steps) // int(min_separation))
  return fit if max_participations_ is None else min(int(max_participations_),
                                                     fit)


def minsep_sensitivity_squared(strategy_coefs: np.ndarray,
                               max_participations_: int | None,
                               min_separation: int) -> float:
  """s: the largest ||C u||^2 over participation patterns u (at most k
  rounds of the T, any two at least b apart), for C lower-triangular
  Toeplitz with first column `strategy_coefs` (length T). A client's
  updates g_i (L2 <= 1) move C x by at most sqrt(s).

  Exact in the two cases the literature proves, else a proven upper bound:
    * C has at most b bands: the participations' columns do not overlap, so
      s is the sum of the k largest column norms^2, the earliest rounds'
      (column t is the first T - t coefficients).
    * coefficients >= 0: C^T C >= 0 entrywise, so the updates all equal is
      the worst case, and for non-increasing coefficients the worst pattern
      is rounds 0, b, 2b, ... (McKenna 2024, arXiv:2405.13763, Theorem 2).
      Coefficients that are not non-increasing are replaced by their
      smallest non-increasing majorant c^_i = max_{j >= i} c_j, which can
      only raise s (C <= C^ entrywise, both >= 0).
    * otherwise: (sum of the k largest column norms)^2, the triangle
      inequality.

  Raises:
    ValueError: for b or k < 1.
  """
  c = np.asarray(strategy_coefs, np.float64)
  n, b = c.size, int(min_separation)
  if b < 1 or (max_participations_ is not None and max_participations_ < 1):
    raise ValueError("min_separation and max_participations must be >= 1; "
                     f"got {min_separation!r}, {max_participations_!r}")
  k = max_participations(n, max_participations_, b)
  starts = np.arange(k) * b
  # Column t of C is c[:T - t]: its norm^2 is the prefix sum of c^2.
  column_norms_sq = np.concatenate([[0.0], np.cumsum(c * c)])[n - starts]
  bands = int(np.max(np.nonzero(c)[0])) + 1 if np.any(c) else 0
  if bands <= b:
    return float(np.sum(column_norms_sq))
  if np.all(c >= 0):
    majorant = np.maximum.accumulate(c[::-1])[::-1]
    v = np.zeros(n)
    for t in starts:
      v[t:] += majorant[:n - t]
    return float(v @ v)
  return float(np.sum(np.sqrt(column_norms_sq)) ** 2)


def sensitivity_squared(strategy, num_steps: int,
                        max_participations_: int | None,
                        min_separation: int) -> float:
  """s of `strategy` over `num_steps` rounds under the (k, b) schema."""
  return minsep_sensitivity_squared(strategy.strategy_coefs(num_steps),
                                    max_participations_, min_separation)


# --- Optimised strategies (jax-privacy), once per setting on the host. ------


@functools.lru_cache(maxsize=32)
def band_mf(num_steps: int, bands: int) -> BandedToeplitz:
  """BandMF: the banded Toeplitz C of `bands` bands (at most T) that
  minimises the mean squared error of the prefix sums, column norm 1
  (jax-privacy's `toeplitz.optimize_banded_toeplitz`, which its authors
  find within 0.5% of general banded strategies for T >= 1000, b <= 32)."""
  from jax_privacy.matrix_factorization import toeplitz  # pylint: disable=g-import-not-at-top
  bands = max(1, min(int(bands), int(num_steps)))
  if bands == 1:
    return BandedToeplitz((1.0,))
  coefs = np.asarray(toeplitz.optimize_banded_toeplitz(int(num_steps), bands),
                     np.float32)
  return BandedToeplitz(tuple(float(x) for x in coefs))


@functools.lru_cache(maxsize=32)
def blt(num_steps: int, max_participations_: int | None, min_separation: int,
        buffers: int) -> BufferedInverse:
  """A BLT strategy of `buffers` buffers for T rounds under the (k, b)
  schema, minimising the mean squared error of the prefix sums
  (jax-privacy's `buffered_toeplitz.optimize`, in float64); the round
  carries C^{-1} as a BLT, whose parameters are rounded to float32 here."""
  from jax_privacy.matrix_factorization import buffered_toeplitz  # pylint: disable=g-import-not-at-top
  with jax.enable_x64(True):
    c = buffered_toeplitz.optimize(
        n=int(num_steps), min_sep=int(min_separation),
        max_participations=max_participations_, error="mean",
        min_buffers=int(buffers), max_buffers=int(buffers))
    inverse = c.inverse()
    decay = np.asarray(inverse.buf_decay, np.float64)
    scale = np.asarray(inverse.output_scale, np.float64)
  return BufferedInverse(tuple(float(np.float32(x)) for x in decay),
                         tuple(float(np.float32(x)) for x in scale))
