"""Privacy-loss distributions of counted events, composed by FFT.

The PLD accountant's arithmetic: dp_accounting builds the PLD of one event
(pessimistic rounding onto a grid); here it is composed `count` times by one
FFT power, within Chernoff tail bounds, and turned into epsilon. This is
what `accounting.epsilon_of_counts` runs for accountant="pld"; it equals
dp_accounting's PLDAccountant composing the same events (tested in
tests/test_pld_composition.py) when the composition fits `PLD_MAX_POINTS` on
dp_accounting's default grid, and is made coarser (still an upper bound)
when it does not.

What makes a ledger's epsilon cheap to ask for every few rounds: a single
event's PLD and the moment generating function of its pmfs (behind the tail
bounds) are computed once per process; a count then costs one FFT power and
one vectorised scan for epsilon.

dp_accounting has no public way to get the PLD of a DpEvent (its
PLDAccountant keeps it private) nor to self-compose a pmf within given tail
bounds, so this module reads its internals; pyproject.toml pins the
dp-accounting releases they were tested with.
"""

import functools
import math
import threading

import dp_accounting
from dp_accounting import pld
from dp_accounting.pld import pld_pmf
from dp_accounting.pld import privacy_loss_distribution as pld_lib
import numpy as np
from scipy import fft as scipy_fft
from scipy import special

# pylint: disable=protected-access

# dp_accounting's default PLD grid interval (nats) and tail mass truncation.
PLD_INTERVAL = 1e-4
TAIL_MASS = 1e-15

# The most points a PLD composition may hold in either of its two pmfs; a
# composition that would hold more is built on a coarser grid. Time and
# memory grow with it (an FFT of that length per pmf); the cost and the
# looseness of the coarser grid are measured in docs/benchmarks.md
# ("Accounting many rounds").
PLD_MAX_POINTS = 2**22

# Orders of the Chernoff tail bounds, in units of 1 / (the pmf's size):
# dp_accounting's own (1 to 20) and smaller ones, which large counts need (a
# billion-fold composition with dp_accounting's alone spans about ten times
# its actual support). The bound holds at every order, so a fixed set serves
# every count, and the pmf's moment generating function is computed once.
_CHERNOFF_ORDERS = np.concatenate([np.arange(1.0, 21.0),
                                   np.geomspace(1e-7, 1.0, 64)])


class UnsupportedEventError(ValueError):
  """dp_accounting's PLD accountant has no PLD for the event."""


class _Pmf:
  """One dense pmf of a single event's PLD, with its log moment generating
  function at `_CHERNOFF_ORDERS` (both signs), computed on first use."""

  def __init__(self, pmf: pld_pmf.PLDPmf):
    self.dense = pmf.to_dense_pmf()

  @property
  def size(self) -> int:
    return self.dense.size

  @functools.cached_property
  def _orders_and_log_mgfs(self) -> tuple[np.ndarray, np.ndarray]:
    orders = np.concatenate([-_CHERNOFF_ORDERS, _CHERNOFF_ORDERS]) / self.size
    index = np.arange(self.size)
    log_mgfs = np.array([special.logsumexp(index * order, b=self.dense._probs)
                         for order in orders])
    return orders, log_mgfs

  def self_convolve_bounds(self, count: int) -> tuple[int, int]:
    """Indices (from count x the pmf's lowest loss) outside which the pmf
    composed `count` times has at most TAIL_MASS / 2 on each side: the
    Chernoff bound of dp_accounting's `compute_self_convolve_bounds` at
    every order of `_CHERNOFF_ORDERS`."""
    orders, log_mgfs = self._orders_and_log_mgfs
    with np.errstate(invalid="ignore", over="ignore"):
      bounds = (count * log_mgfs + math.log(2 / TAIL_MASS)) / orders
    finite = np.isfinite(bounds)
    upper, lower = (self.size - 1) * count, 0
    above = bounds[finite & (orders > 0)]
    below = bounds[finite & (orders < 0)]
    if above.size:
      upper = min(upper, math.ceil(float(np.min(above))))
    if below.size:
      lower = max(lower, math.floor(float(np.max(below))))
    return lower, upper

  def self_compose(self, count: int,
                   bounds: tuple[int, int]) -> pld_pmf.DensePLDPmf:
    """dp_accounting's DensePLDPmf.self_compose, kept within `bounds`.

    The count-th power of the pmf's FFT; the mass outside the bounds (at
    most TAIL_MASS) is also counted as an infinite loss, a pessimistic
    estimate, as in dp_accounting.
    """
    dense = self.dense
    lower, upper = bounds
    length = upper - lower + 1
    fast_len = scipy_fft.next_fast_len(max(length, dense.size))
    probs = np.real(
        scipy_fft.ifft(scipy_fft.fft(dense._probs, fast_len) ** count))
    probs = np.roll(probs, -lower)[:length]
    infinity_mass = TAIL_MASS - math.expm1(
        count * math.log1p(-dense._infinity_mass))
    return pld_pmf.DensePLDPmf(
        dense._discretization, dense._lower_loss * count + lower, probs,
        infinity_mass, dense._pessimistic_estimate)


class _Single:
  """The PLD of one event on one grid: its pmfs (remove, and add when the
  PLD is not symmetric) and whether the event is not DP at all."""

  def __init__(self, event: dp_accounting.DpEvent,
               relation: dp_accounting.NeighboringRelation, interval: float):
    acc = pld.PLDAccountant(neighboring_relation=relation,
                            value_discretization_interval=interval)
    if not acc.supports(event):
      raise UnsupportedEventError(event)
    acc.compose(event)
    self.non_dp = acc._contains_non_dp_event
    self.pld = acc._pld
    raw = ((self.pld._pmf_remove,) if self.pld._symmetric else
           (self.pld._pmf_remove, self.pld._pmf_add))
    self.pmfs = tuple(_Pmf(p) for p in raw)


@functools.lru_cache(maxsize=32)
def _single_cached(event: dp_accounting.DpEvent,
                   relation: dp_accounting.NeighboringRelation,
                   interval: float) -> _Single:
  return _Single(event, relation, interval)


# Threads that ask for the same PLD at once (a run's planned epsilon and its
# first reported one) build it once.
_SINGLE_LOCK = threading.Lock()


def _single(event: dp_accounting.DpEvent,
            relation: dp_accounting.NeighboringRelation,
            interval: float) -> _Single:
  """dp_accounting's PLD of one event (built by its own PLDAccountant),
  cached: building one takes ~0.5 s on the default grid, composing it is
  much faster."""
  with _SINGLE_LOCK:
    return _single_cached(event, relation, interval)


def epsilon_for_delta(pmf: pld_pmf.DensePLDPmf, delta: float) -> float:
  """dp_accounting's `DensePLDPmf.get_epsilon_for_delta`, vectorised.

  The smallest epsilon >= 0 with hockey-stick divergence at most delta:
  dp_accounting scans losses from the largest down, accumulating the mass
  above (with the infinite loss) and its e^-loss-weighted mass, and stops
  at the first loss below the epsilon those masses give. The same sums are
  cumulative sums in the same order here, and the stopping point is found
  for all losses at once.
  """
  infinity_mass = pmf._infinity_mass
  if infinity_mass > delta:
    return math.inf
  probs = np.flip(pmf._probs)
  if probs.size == 0:  # all mass at the infinite loss, at most delta
    return 0.0
  upper_loss = (pmf._lower_loss + probs.size - 1) * pmf._discretization
  # The losses and running sums are accumulated in dp_accounting's order
  # (its losses come from repeatedly subtracting the interval), so that they
  # are the same floating-point numbers.
  losses = np.cumsum(np.concatenate(
      [[upper_loss], np.full(probs.size - 1, -pmf._discretization)]))
  # Masses before adding loss i (as the scan holds them when it checks i),
  # and after.
  before_upper = np.cumsum(np.concatenate([[infinity_mass], probs]))
  with np.errstate(over="ignore"):  # a loss below -709 weighs inf
    weighted = np.exp(-losses) * probs
  before_lower = np.cumsum(np.concatenate([[0.0], weighted]))
  mass_upper, mass_lower = before_upper[1:], before_lower[1:]
  before_upper, before_lower = before_upper[:-1], before_lower[:-1]
  with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
    stops = ((before_upper > delta) & (before_lower > 0)
             & (np.log((before_upper - delta) / before_lower) >= losses))
  # The scan also returns at the first loss after which the mass above
  # reaches delta with no e^-loss-weighted mass (losses so large that
  # exp(-loss) is 0).
  saturated = (mass_upper >= delta) & (mass_lower == 0)
  stop = int(np.argmax(stops)) if stops.any() else probs.size
  first_saturated = (int(np.argmax(saturated)) if saturated.any()
                     else probs.size)
  if first_saturated < stop:
    return max(0.0, float(losses[first_saturated]))
  # The masses when the scan ends (at `stop`, or after the last loss).
  upper = float(np.concatenate([before_upper, mass_upper[-1:]])[stop])
  lower = float(np.concatenate([before_lower, mass_lower[-1:]])[stop])
  if upper <= lower + delta:
    return 0.0
  return math.log((upper - delta) / lower)


def _parts(counts: tuple, relation: dp_accounting.NeighboringRelation):
  """(single-event PLD, count, self-convolution bounds of each of its pmfs)
  on the finest grid (PLD_INTERVAL times a power of two) whose composition
  fits PLD_MAX_POINTS; None when an event is not DP."""
  interval = PLD_INTERVAL
  for _ in range(40):
    singles = [(_single(e, relation, interval), c) for e, c in counts]
    if any(single.non_dp for single, _ in singles):
      return None
    parts = []
    points = [0, 0]  # of the composition's remove and add pmfs
    for single, count in singles:
      bounds = [None] * len(single.pmfs)
      if count > 1:
        bounds = [pmf.self_convolve_bounds(count) for pmf in single.pmfs]
      sizes = [pmf.size if b is None else max(b[1] - b[0] + 1, pmf.size)
               for pmf, b in zip(single.pmfs, bounds)]
      points[0] += sizes[0]
      points[1] += sizes[-1]
      parts.append((single, count, bounds))
    if max(points) <= PLD_MAX_POINTS:
      return parts
    # Points scale about as 1 / interval.
    interval *= 2.0 ** max(
        1, math.ceil(math.log2(max(points) / PLD_MAX_POINTS)))
  raise UnsupportedEventError(
      "the pld accountant cannot compose these events in bounded memory; "
      "use accountant='rdp'")


class ComposedPld:
  """Composition of (event, count) pairs, with an accountant's
  get_epsilon / get_delta.

  Args:
    counts: (event, count) pairs, each count >= 1.
    relation: dp_accounting's neighbouring relation of the events.

  Raises:
    UnsupportedEventError: dp_accounting has no PLD for an event, or the
      composition cannot be held in bounded memory.
  """

  def __init__(self, counts: tuple,
               relation: dp_accounting.NeighboringRelation):
    parts = _parts(counts, relation)
    self._non_dp = parts is None
    self._pld = None
    for single, count, bounds in parts or ():
      composed = single.pld
      if count > 1:
        composed = pld_lib.PrivacyLossDistribution(*[
            pmf.self_compose(count, b) for pmf, b in zip(single.pmfs, bounds)])
      self._pld = composed if self._pld is None else self._pld.compose(
          composed)

  @property
  def grid(self) -> float | None:
    """The composition's grid interval (None when an event is not DP)."""
    return None if self._pld is None else self._pld._pmf_remove._discretization

  def get_epsilon(self, delta: float) -> float:
    """dp_accounting's `PrivacyLossDistribution.get_epsilon_for_delta`."""
    if self._non_dp:
      return math.inf
    pmfs = [self._pld._pmf_remove]
    if not self._pld._symmetric:
      pmfs.append(self._pld._pmf_add)
    # A sparse pmf (a single event of few losses) is small: dp_accounting's
    # own scan is fast there.
    return max(epsilon_for_delta(p, delta)
               if isinstance(p, pld_pmf.DensePLDPmf)
               else p.get_epsilon_for_delta(delta) for p in pmfs)

  def get_delta(self, epsilon: float) -> float:
    return (1.0 if self._non_dp
            else self._pld.get_delta_for_epsilon(epsilon))
