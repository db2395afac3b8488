"""The privacy ledger: one dp_accounting event per round, composed on the host.

Privacy: the ledger reports (epsilon, delta) for the neighbouring relation of
the sampler whose events it holds (add/remove-one-client for Poisson
sampling, replace-one-client for fixed-size sampling, replace-special for
DP-FTRL's disjoint cohorts, local for the per-client guarantee of local
noise; see clipping.NeighbouringRelation). Events are composed
adaptively; dp_accounting's PLD and RDP accountants both allow that.

Two accountants:
  * "pld": dp_accounting's privacy-loss-distribution accountant (tight).
    It has no event for sampling without replacement, so fixed-size sampling
    is refused rather than accounted as something else.
  * "rdp": dp_accounting's Renyi accountant (Mironov 2017; Wang et al. 2019
    for sampling without replacement).

Both report an upper bound on the true epsilon of the events under the
ledger's neighbouring relation. The PLD accountant places privacy losses on a
grid, rounding pessimistically (dp_accounting's default), which keeps its
epsilon an upper bound at any grid interval (up to the floating-point
rounding of the FFTs that compose it). The grid is dp_accounting's default
of 1e-4 nats unless the composition would hold more than
`pld_composition.PLD_MAX_POINTS`
points (for Poisson-sampled Gaussian rounds, from some millions of rounds
on); it is then made coarser by a power of two, so that time and memory stay
bounded for any number of rounds. The bound stays valid but is looser on a
coarser grid.

Accounting costs time in the number of distinct events, not of rounds: equal
events are composed as one self-composition (`epsilon_of_counts`).

Truncated Poisson rounds (a draw larger than the block keeps a random subset
of `capacity` clients; recorded as dp_accounting's
`TruncatedSubsampledGaussianDpEvent`) are accounted by both accountants as the
untruncated Poisson round plus the probability that truncation happened at
all: if the untruncated T-round mechanism M is (eps, delta0)-DP and the
truncated M' differs from it only on an event of probability <= beta on every
dataset (couple the two with the same randomness), then for any output set O,
P[M'(D) in O] <= P[M(D) in O] + beta <= e^eps (P[M'(D') in O] + beta) + delta0
+ beta, i.e. M' is (eps, delta0 + (1 + e^eps) beta)-DP, with beta the sum over
rounds of P[Binomial(n + 1, q) > capacity]. Samplers size blocks so that beta
is negligible (1e-30 per round). This bound is never below dp_accounting's
exact PLD of the truncated event, and it is fast: that exact PLD takes
seconds per query, too slow for a per-round epsilon.
"""

import collections
import dataclasses
import functools
import logging
import math
import numbers
from typing import Callable, Iterable, Sequence

import dp_accounting
from dp_accounting import pld
from dp_accounting import rdp
from dp_accounting.rdp import rdp_privacy_accountant
import numpy as np
from scipy import stats

from fedjax_dp.privacy import clipping
from fedjax_dp.privacy import pld_composition

ACCOUNTANTS = ("pld", "rdp")


class _DropUnconvergedOrders(logging.Filter):
  """dp_accounting's RDP accountant warns when its series for a fractional
  order below 2 does not converge, and leaves that order out. The epsilon is
  then the minimum over the remaining orders: still a valid upper bound (at
  worst a little looser). The warning says nothing a user can act on, so it
  is not shown."""

  def filter(self, record: logging.LogRecord) -> bool:
    return "_compute_log_a_frac failed to converge" not in record.getMessage()


logging.getLogger("absl").addFilter(_DropUnconvergedOrders())

_RELATIONS = {
    clipping.NeighbouringRelation.ADD_OR_REMOVE_ONE:
        dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
    clipping.NeighbouringRelation.REPLACE_ONE:
        dp_accounting.NeighboringRelation.REPLACE_ONE,
    clipping.NeighbouringRelation.REPLACE_SPECIAL:
        dp_accounting.NeighboringRelation.REPLACE_SPECIAL,
    # Local events are unsampled mechanisms whose noise multiplier already
    # divides by the replacement's sensitivity 2C (e.g. GaussianDpEvent(z/2)):
    # for those, dp_accounting's add/remove accounting is the mechanism's
    # exact privacy loss (a shift by at most one unit, in either direction).
    clipping.NeighbouringRelation.LOCAL:
        dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
}


# The relations a ledger accounts under (defined beside the clip that fixes
# their sensitivities).
Relation = clipping.NeighbouringRelation


def relation_named(name: str) -> Relation:
  """The relation whose value is `name` (e.g. "add_or_remove_one").

  Raises:
    ValueError: no relation has that name.
  """
  return Relation(name)


def dp_accounting_relation(relation: Relation
                           ) -> dp_accounting.NeighboringRelation:
  """dp_accounting's relation that accounts events recorded under
  `relation` (local events are accounted as add/remove; see above)."""
  return _RELATIONS[relation]


class UnsupportedAccountingError(ValueError):
  """An accountant cannot account an event exactly as it ran."""


def check_delta(delta: float) -> None:
  if not 0 < delta < 1:
    raise ValueError(f"delta must be in (0, 1), got {delta!r}")


def check_accountant(accountant: str) -> None:
  if accountant not in ACCOUNTANTS:
    raise ValueError(
        f"accountant must be one of {list(ACCOUNTANTS)}, got {accountant!r}")


def make_accountant(
    accountant: str, relation: clipping.NeighbouringRelation
) -> dp_accounting.PrivacyAccountant:
  """A fresh dp_accounting accountant for `relation`."""
  check_accountant(accountant)
  rel = _RELATIONS[relation]
  if accountant == "pld":
    return pld.PLDAccountant(neighboring_relation=rel)
  return rdp.RdpAccountant(neighboring_relation=rel)


def _group(counts) -> dp_accounting.DpEvent:
  """(event, count) pairs as one event; equal events as SelfComposedDpEvent
  (much faster to account)."""
  return dp_accounting.ComposedDpEvent([
      e if c == 1 else dp_accounting.SelfComposedDpEvent(e, c)
      for e, c in counts])


def _composed_pld(counts: tuple,
                  relation: clipping.NeighbouringRelation):
  """The PLD composition of (event, count) pairs (pld_composition.py)."""
  try:
    return pld_composition.ComposedPld(counts, _RELATIONS[relation])
  except pld_composition.UnsupportedEventError as e:
    if isinstance(e.args[0], str):
      raise UnsupportedAccountingError(e.args[0]) from None
    raise UnsupportedAccountingError(
        f"the pld accountant cannot account {e.args[0]} under "
        f"{relation.value} neighbours (dp_accounting's PLD has no event for "
        "sampling without replacement); use accountant='rdp'") from None


@functools.lru_cache(maxsize=256)
def _single_event_rdp(event: dp_accounting.DpEvent,
                      relation: clipping.NeighbouringRelation) -> np.ndarray:
  """dp_accounting's RDP curve (at its default orders) of one event.

  RDP composes by adding curves, so T equal events cost one curve times T.
  """
  acc = make_accountant("rdp", relation)
  if not acc.supports(event):
    raise UnsupportedAccountingError(
        f"the rdp accountant cannot account {event} under {relation.value} "
        "neighbours")
  acc.compose(event)
  curve = np.asarray(acc.rdp, dtype=np.float64)
  curve.flags.writeable = False
  return curve


class _ComposedRdp:
  """Composition of (event, count) pairs as one RDP curve, with the
  accountant's interface (dp_accounting's own conversions to epsilon and
  delta, at its default orders)."""

  def __init__(self, counts: tuple, relation: clipping.NeighbouringRelation):
    self._orders = rdp.RdpAccountant().orders
    self._curve = sum((count * _single_event_rdp(event, relation)
                       for event, count in counts),
                      np.zeros(len(self._orders)))

  def get_epsilon(self, delta: float) -> float:
    return rdp_privacy_accountant.compute_epsilon(self._orders, self._curve,
                                                  delta)[0]

  def get_delta(self, epsilon: float) -> float:
    return rdp_privacy_accountant.compute_delta(self._orders, self._curve,
                                                epsilon)[0]


def effective_noise_multiplier(*noise_multipliers: float) -> float:
  """(sum_k z_k^-2)^(-1/2): Gaussians on the same data as one Gaussian."""
  if any(z == 0 for z in noise_multipliers):
    return 0.0
  return sum(z ** -2 for z in noise_multipliers) ** -0.5


def _gaussian_multiplier(event: dp_accounting.DpEvent) -> float | None:
  """Effective z of a Gaussian or a composition of Gaussians, else None."""
  if isinstance(event, dp_accounting.GaussianDpEvent):
    return float(event.noise_multiplier)
  if isinstance(event, dp_accounting.SelfComposedDpEvent):
    z = _gaussian_multiplier(event.event)
    return None if z is None else (
        0.0 if z == 0 else z / math.sqrt(event.count))
  if isinstance(event, dp_accounting.ComposedDpEvent):
    zs = [_gaussian_multiplier(e) for e in event.events]
    return None if any(z is None for z in zs) else (
        effective_noise_multiplier(*zs))
  return None


def as_single_gaussian(event: dp_accounting.DpEvent) -> dp_accounting.DpEvent:
  """A sampled composition of Gaussians as the equal single Gaussian.

  PoissonSampledDpEvent(q, Composed([Gaussian(z_1), ...])) becomes
  PoissonSampledDpEvent(q, Gaussian((sum z_k^-2)^(-1/2))), and likewise
  inside SampledWithoutReplacementDpEvent. This is an identity of mechanisms
  (both are the same Gaussian mechanism up to invertible post-processing), not
  a bound; it is what dp_accounting's RDP accountant computes internally, and
  it lets the PLD accountant (which refuses compositions inside sampling
  events) account adaptive-clipping rounds. Other events are returned as is.
  """
  if isinstance(event, dp_accounting.PoissonSampledDpEvent):
    z = _gaussian_multiplier(event.event)
    if z is not None:
      return dp_accounting.PoissonSampledDpEvent(
          event.sampling_probability, dp_accounting.GaussianDpEvent(z))
  if isinstance(event, dp_accounting.SampledWithoutReplacementDpEvent):
    z = _gaussian_multiplier(event.event)
    if z is not None:
      return dp_accounting.SampledWithoutReplacementDpEvent(
          event.source_dataset_size, event.sample_size,
          dp_accounting.GaussianDpEvent(z))
  return event


def untruncated_view(
    event: dp_accounting.DpEvent,
) -> tuple[dp_accounting.DpEvent, float]:
  """(the event without truncation, probability that truncation happened).

  Sampled compositions of Gaussians (adaptive clipping's two releases) are
  rewritten as the equal single Gaussian, which both accountants take.
  """
  event = as_single_gaussian(event)
  if isinstance(event, dp_accounting.TruncatedSubsampledGaussianDpEvent):
    q = event.sampling_probability
    beta = float(stats.binom.sf(
        event.truncated_batch_size, event.dataset_size, q))
    untruncated = dp_accounting.PoissonSampledDpEvent(
        q, dp_accounting.GaussianDpEvent(event.noise_multiplier))
    return untruncated, beta
  return event, 0.0


@functools.lru_cache(maxsize=1024)
def _cached_view(event: dp_accounting.DpEvent):
  return untruncated_view(event)


def _view(event: dp_accounting.DpEvent) -> tuple[dp_accounting.DpEvent, float]:
  """`untruncated_view(event)`, cached for hashable events."""
  try:
    hash(event)
  except TypeError:  # holds a list
    return untruncated_view(event)
  return _cached_view(event)


def epsilon_with_truncation_slack(acc, delta: float, beta: float) -> float:
  """Smallest eps with acc.delta(eps) + (1 + e^eps) * beta <= delta.

  `acc` has composed the untruncated events and `beta` bounds the probability
  that any truncation happened (see the module docstring).
  """
  eps = float(acc.get_epsilon(delta))
  if beta == 0.0:
    return eps
  # A slack below delta's float resolution leaves get_epsilon's argument
  # unchanged: reuse its answer (each call costs tens of ms with PLD).
  known = {delta: eps}
  # The slack grows with eps, so start from the untruncated answer and move up
  # until the condition, checked with the accountant's own delta(eps), holds.
  for _ in range(200):
    slack = (1.0 + math.exp(min(eps, 700.0))) * beta
    if slack >= delta:
      return math.inf
    target = delta - slack
    if target not in known:
      known[target] = float(acc.get_epsilon(target))
    eps = max(eps, known[target])
    if acc.get_delta(eps) + (1.0 + math.exp(min(eps, 700.0))) * beta <= delta:
      return eps
    eps += 1e-4 * max(eps, 1.0)  # past the accountant's discretisation
  return math.inf


def _check_count(count) -> int:
  if (isinstance(count, bool) or not isinstance(count, numbers.Integral)
      or count < 1):
    raise ValueError(f"an event's count must be an integer >= 1, got "
                     f"{count!r}")
  return int(count)


def _epsilon_of_views(views: collections.Counter, delta: float,
                      accountant: str,
                      relation: clipping.NeighbouringRelation) -> float:
  """Epsilon of a Counter of `_view` pairs ((untruncated event, beta) ->
  count): the untruncated events composed, and a truncation slack of the sum
  of beta times count."""
  untruncated = collections.Counter()
  beta = 0.0
  for (event, event_beta), count in views.items():
    untruncated[event] += count
    beta += event_beta * count
  if not untruncated:
    return 0.0
  return _epsilon(tuple(untruncated.items()), beta, delta, accountant,
                  relation)


def epsilon_of_counts(
    counts: Iterable[tuple[dp_accounting.DpEvent, int]],
    delta: float,
    *,
    accountant: str,
    relation: clipping.NeighbouringRelation,
) -> float:
  """Epsilon at `delta` of the adaptive composition of counted events.

  Args:
    counts: (event, count) pairs, count an integer >= 1: the event ran
      `count` times. Equal events may appear in several pairs. The cost grows
      with the number of distinct events, not with the counts.
    delta: in (0, 1).
    accountant: "pld" or "rdp".
    relation: the neighbouring relation of the events.

  Returns:
    An upper bound on the epsilon of the composition under `relation` (0.0
    without events, inf when an event is not DP).

  Raises:
    UnsupportedAccountingError: the accountant cannot account these events
      as they ran.
  """
  check_delta(delta)
  check_accountant(accountant)
  views = collections.Counter()
  for event, count in counts:
    views[_view(event)] += _check_count(count)
  return _epsilon_of_views(views, delta, accountant, relation)


def epsilon_of(
    events: Sequence[dp_accounting.DpEvent],
    delta: float,
    *,
    accountant: str,
    relation: clipping.NeighbouringRelation,
) -> float:
  """Epsilon at `delta` of the adaptive composition of `events`.

  Equal to `epsilon_of_counts` with each event counted once.

  Raises:
    UnsupportedAccountingError: the accountant cannot account these events
      as they ran.
  """
  return epsilon_of_counts(((e, 1) for e in events), delta,
                           accountant=accountant, relation=relation)


@functools.lru_cache(maxsize=64)
def _epsilon(counts: tuple, beta: float, delta: float, accountant: str,
             relation: clipping.NeighbouringRelation) -> float:
  """Epsilon of (untruncated event, count) pairs with truncation slack
  `beta`, memoised: a runner asks for the same history more than once per
  round (a budget check before it, the epsilon after it, a summary per
  accountant)."""
  if accountant == "pld":
    acc = _composed_pld(counts, relation)
  else:
    acc = _ComposedRdp(counts, relation)
  return epsilon_with_truncation_slack(acc, delta, beta)


@dataclasses.dataclass
class LedgerEntry:
  round: int
  event: dp_accounting.DpEvent


class PrivacyLedger:
  """Records one DP event per released round and reports epsilon.

  Record a round's event before its result is released (logged, written or
  used): a round that has been computed must never go unaccounted.

  The ledger keeps a count of each distinct event, so that epsilon costs
  time in the number of distinct events, not in the number of rounds.

  Args:
    relation: the neighbouring relation of every event recorded here.
    delta: the delta at which epsilon is reported.
    accountant: "pld" or "rdp", the accountant for `epsilon()`.
  """

  def __init__(
      self,
      relation: clipping.NeighbouringRelation,
      delta: float,
      accountant: str = "pld",
  ):
    check_delta(delta)
    check_accountant(accountant)
    self.relation = relation
    self.delta = delta
    self.accountant = accountant
    self._entries: list[LedgerEntry] = []
    self._rounds: set[int] = set()
    self._views = collections.Counter()  # _view(event) -> count

  @property
  def entries(self) -> tuple[LedgerEntry, ...]:
    return tuple(self._entries)

  @property
  def events(self) -> list[dp_accounting.DpEvent]:
    return [e.event for e in self._entries]

  @property
  def num_rounds(self) -> int:
    return len(self._entries)

  def first(self, num_rounds: int) -> "PrivacyLedger":
    """A new ledger holding this one's first `num_rounds` entries."""
    ledger = PrivacyLedger(self.relation, self.delta, self.accountant)
    for entry in self._entries[:num_rounds]:
      ledger.record(entry.round, entry.event)
    return ledger

  def record(self, round_index: int, event: dp_accounting.DpEvent) -> None:
    """Adds round `round_index`'s event; each round may be recorded once."""
    round_index = int(round_index)
    if round_index in self._rounds:
      raise ValueError(f"round {round_index} is already in the ledger")
    self._views[_view(event)] += 1
    self._entries.append(LedgerEntry(round_index, event))
    self._rounds.add(round_index)

  def epsilon(self, accountant: str | None = None,
              delta: float | None = None) -> float:
    """Epsilon so far at `delta` (default: the ledger's)."""
    delta = self.delta if delta is None else delta
    accountant = accountant or self.accountant
    check_delta(delta)
    check_accountant(accountant)
    return _epsilon_of_views(self._views, delta, accountant, self.relation)

  def frozen_epsilon(self, accountant: str | None = None
                     ) -> Callable[[], float]:
    """A function returning the epsilon `epsilon(accountant)` returns now,
    whatever is recorded later (for another thread to compute)."""
    accountant = accountant or self.accountant
    check_accountant(accountant)
    return functools.partial(_epsilon_of_views, self._views.copy(),
                             self.delta, accountant, self.relation)

  def epsilon_if(self, event: dp_accounting.DpEvent,
                 accountant: str | None = None) -> float:
    """Epsilon the ledger would report after also recording `event`."""
    return self.epsilon_after([event], accountant)

  def epsilon_after(self, events: Sequence[dp_accounting.DpEvent],
                    accountant: str | None = None) -> float:
    """Epsilon the ledger would report after also recording `events`; the
    ledger is unchanged."""
    accountant = accountant or self.accountant
    check_accountant(accountant)
    views = self._views.copy()
    for event in events:
      views[_view(event)] += 1
    return _epsilon_of_views(views, self.delta, accountant, self.relation)


# Calibration searches noise multipliers in this range. At 0.1 a single
# round already costs an epsilon of 75 (q=0.01, delta=1e-5; more for larger
# q), and dp_accounting's PLD of that one round takes ~10 s and over a
# million points, growing fast below (44 s at 0.05); no DP federated
# training uses such multipliers. Above 1e6 the noise swamps any update of
# norm <= clip.
MIN_CALIBRATED_NOISE_MULTIPLIER = 0.1
MAX_CALIBRATED_NOISE_MULTIPLIER = 1e6
# The smallest target epsilon calibration accepts: 100 times the PLD's grid
# interval (1e-4 nats). Below it the epsilon the accountants report says more
# about their resolution (the PLD's grid, RDP's finite set of orders) than
# about the noise.
MIN_TARGET_EPSILON = 0.01


def _smallest_multiplier(eps: Callable[[float], float], target: float,
                         start: float, rel_tol: float) -> float | None:
  """The smallest z in [MIN, MAX]_CALIBRATED_NOISE_MULTIPLIER with
  eps(z) <= target, within rel_tol, searched from `start`; None when
  eps(MIN_CALIBRATED_NOISE_MULTIPLIER) <= target already.

  Returns a z for which eps(z) <= target was computed (MAX when even eps(MAX)
  exceeds target), and eps(z / (1 + rel_tol)) > target. Brackets by steps
  from `start` that square each time, then narrows the bracket.
  """
  low, high = MIN_CALIBRATED_NOISE_MULTIPLIER, MAX_CALIBRATED_NOISE_MULTIPLIER
  step = 1.1
  z = min(max(start, low), high)
  if eps(z) <= target:
    hi = z
    while True:
      if hi <= low:
        return None
      lo = max(hi / step, low)
      if eps(lo) > target:
        break
      hi, step = lo, step * step
  else:
    lo = z
    while True:
      if lo >= high:
        return high
      hi = min(lo * step, high)
      if eps(hi) <= target:
        break
      lo, step = hi, step * step
  # eps(lo) > target >= eps(hi). Epsilon is close to a power of z, so the
  # root of the line through (log z, log eps) at both ends is a good guess;
  # it is kept rel_tol / 2 inside the bracket (so that a guess next to the
  # root closes it) and replaced by the midpoint after two steps in a row
  # that did not halve the bracket.
  tol = math.log1p(rel_tol)
  stalled = 0
  while math.log(hi / lo) > tol:
    a, b = math.log(lo), math.log(hi)
    ea, eb = eps(lo), eps(hi)
    u = 0.5 * (a + b)
    if stalled < 2 and math.isfinite(ea) and eb > 0:
      fa, fb = math.log(ea / target), math.log(eb / target)
      u = min(max(a + fa * (b - a) / (fa - fb), a + tol / 2), b - tol / 2)
    mid = math.exp(u)
    if not lo < mid < hi:
      break
    if eps(mid) > target:
      lo = mid
    else:
      hi = mid
    stalled = 0 if math.log(hi / lo) <= 0.5 * (b - a) else stalled + 1
  return hi


def calibrate_noise_multiplier(
    make_event: Callable[[float], dp_accounting.DpEvent],
    *,
    target_epsilon: float,
    delta: float,
    rounds: int,
    accountant: str,
    relation: clipping.NeighbouringRelation,
    rel_tol: float = 1e-4,
) -> float:
  """Smallest noise multiplier z with epsilon(rounds x make_event(z)) <= target.

  z is searched in [MIN_CALIBRATED_NOISE_MULTIPLIER,
  MAX_CALIBRATED_NOISE_MULTIPLIER]; the time does not grow with `rounds`
  (apart from the PLD's own cost, which is bounded).

  Why not `dp_accounting.mechanism_calibration.calibrate_dp_mechanism`: it
  bisects over a fresh dp_accounting accountant per probe, composing the
  whole run each time, while the epsilon a run reports is this module's
  (`epsilon_of_counts`: truncated Poisson rounds widened by their slack,
  PLD compositions on a bounded grid, one curve per distinct event), which
  no dp_accounting accountant computes. Calibrating on the same function
  the ledger reports is what guarantees the calibrated run meets its target.

  Args:
    make_event: z -> the DP event of one round (a sampler's `dp_event`).
    target_epsilon: finite, >= MIN_TARGET_EPSILON.
    delta: in (0, 1).
    rounds: an integer >= 1.
    accountant: "pld" or "rdp".
    relation: neighbouring relation of the events.
    rel_tol: relative tolerance on z, in (0, 1).

  Returns:
    z with epsilon <= target_epsilon as `epsilon_of_counts` computes it, within
    rel_tol of the smallest such z in the range.

  Raises:
    ValueError: an invalid argument, a target below MIN_TARGET_EPSILON, no
      multiplier in the range reaching the target, or every multiplier in
      the range meeting it (no meaningful noise is needed: set the noise
      multiplier directly).
    UnsupportedAccountingError: the accountant cannot account the events.
  """
  if (not isinstance(target_epsilon, numbers.Real)
      or not math.isfinite(target_epsilon)):
    raise ValueError(f"target_epsilon must be a finite number >= "
                     f"{MIN_TARGET_EPSILON:g}, got {target_epsilon!r}")
  if target_epsilon < MIN_TARGET_EPSILON:
    raise ValueError(
        f"target_epsilon={target_epsilon!r} is below {MIN_TARGET_EPSILON:g}, "
        "the smallest epsilon the accountants resolve (below it their "
        "discretisation, not the noise, decides the epsilon they report); "
        f"allowed range: [{MIN_TARGET_EPSILON:g}, inf)")
  if (isinstance(rounds, bool) or not isinstance(rounds, numbers.Integral)
      or rounds < 1):
    raise ValueError(f"rounds must be an integer >= 1, got {rounds!r}")
  if not 0 < rel_tol < 1:
    raise ValueError(f"rel_tol must be in (0, 1), got {rel_tol!r}")
  check_delta(delta)
  check_accountant(accountant)
  rounds = int(rounds)
  target = float(target_epsilon)

  @functools.cache
  def eps(z: float, *, with_accountant: str) -> float:
    return epsilon_of_counts([(make_event(z), rounds)], delta,
                             accountant=with_accountant, relation=relation)

  high = MAX_CALIBRATED_NOISE_MULTIPLIER
  eps_high = eps(high, with_accountant=accountant)
  if eps_high > target:
    raise ValueError(
        f"no noise multiplier up to {high:g} reaches target_epsilon="
        f"{target:g} over {rounds} rounds at delta={delta:g} (epsilon there "
        f"is {eps_high:.4g})")
  # Truncated Poisson rounds pay (1 + e^eps) beta of delta (module
  # docstring), so no finite epsilon reaches log(delta / beta - 1); eps(high)
  # <= target makes beta < delta / 2.
  beta = _view(make_event(high))[1] * rounds
  if beta > 0 and target >= math.log(delta / beta - 1):
    raise ValueError(
        f"target_epsilon={target:g} is above every finite epsilon of these "
        f"{rounds} rounds at delta={delta:g}: their truncation probability "
        f"{beta:.3g} leaves room for epsilons below "
        f"{math.log(delta / beta - 1):.4g} only (truncated Poisson rounds "
        "spend (1 + e^epsilon) x that probability of delta); no meaningful "
        "noise is needed to meet it; set noise_multiplier directly instead")
  # Which accountant shows that even the smallest multiplier meets the
  # target, if one does.
  meets_at_low = None
  z = 1.0
  if accountant == "pld":
    # The RDP accountant is fast and rarely below the PLD: its answer is a
    # close starting point for the PLD's search. Both bound the true epsilon
    # from above, so where RDP meets the target at the smallest multiplier,
    # every multiplier in the range does.
    try:
      z = _smallest_multiplier(
          functools.partial(eps, with_accountant="rdp"), target, z, rel_tol)
    except UnsupportedAccountingError:
      pass
    if z is None:
      meets_at_low = "rdp"
  if meets_at_low is None:
    z = _smallest_multiplier(
        functools.partial(eps, with_accountant=accountant), target, z, rel_tol)
    if z is None:
      meets_at_low = accountant
  if meets_at_low is not None:
    low = MIN_CALIBRATED_NOISE_MULTIPLIER
    raise ValueError(
        f"every noise multiplier down to {low:g} meets target_epsilon="
        f"{target:g} over {rounds} rounds at delta={delta:g} (epsilon there "
        f"is {eps(low, with_accountant=meets_at_low):.4g} by the "
        f"{meets_at_low} accountant): no meaningful noise is needed; "
        f"calibration does not search below {low:g}; set noise_multiplier "
        "directly instead")
  return z


def rdp_epsilon_classic(
    events: Sequence[dp_accounting.DpEvent],
    delta: float,
    *,
    relation: clipping.NeighbouringRelation,
    orders: Sequence[float],
) -> float:
  """Epsilon by the original RDP-to-(eps, delta) conversion (Mironov 2017).

  eps = min over orders a of RDP(a) + log(1 / delta) / (a - 1), with the RDP
  curve composed by dp_accounting. Older papers (Abadi et al. 2016's moments
  accountant, TensorFlow Privacy's tutorials) report this value; it is looser
  than `epsilon_of(..., accountant="rdp")`, which uses dp_accounting's
  tighter conversion. Use it to reproduce published numbers.
  """
  check_delta(delta)
  acc = rdp.RdpAccountant(orders=list(orders),
                          neighboring_relation=_RELATIONS[relation])
  views = [untruncated_view(e) for e in events]
  if any(beta > 0 for _, beta in views):
    raise UnsupportedAccountingError(
        "rdp_epsilon_classic does not take truncated Poisson rounds")
  acc.compose(_group(collections.Counter(v for v, _ in views).items()))
  curve = np.asarray(acc.rdp, dtype=np.float64)
  a = np.asarray(orders, dtype=np.float64)
  return float(np.min(curve + math.log(1.0 / delta) / (a - 1.0)))
