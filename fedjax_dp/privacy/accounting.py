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
import math
from typing import Sequence

import dp_accounting
from dp_accounting import pld
from dp_accounting import rdp
import numpy as np
from scipy import stats

from fedjax_dp.privacy import clipping

ACCOUNTANTS = ("pld", "rdp")

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


@functools.lru_cache(maxsize=64)
def _single_event_pld(event: dp_accounting.DpEvent,
                      relation: clipping.NeighbouringRelation):
  """dp_accounting's PLD of one event, built by its own PLDAccountant.

  Building a PLD takes ~0.5 s while composing it T times is fast, so the
  single-event PLD is cached: a per-round epsilon then costs milliseconds.
  """
  acc = make_accountant("pld", relation)
  if not acc.supports(event):
    raise UnsupportedAccountingError(
        f"the pld accountant cannot account {event} under {relation.value} "
        "neighbours (dp_accounting's PLD has no event for sampling without "
        "replacement); use accountant='rdp'")
  acc.compose(event)
  # pylint: disable-next=protected-access
  return acc._pld, acc._contains_non_dp_event


class _ComposedPld:
  """Composition of cached single-event PLDs, with the accountant's interface.

  Equal to dp_accounting's PLDAccountant composing the same events (tested).
  """

  def __init__(self, parts):
    self._non_dp = any(non_dp for (_, non_dp), _ in parts)
    self._pld = None
    if not self._non_dp:
      for (single, _), count in parts:
        composed = single.self_compose(count) if count > 1 else single
        self._pld = composed if self._pld is None else self._pld.compose(
            composed)

  def get_epsilon(self, delta: float) -> float:
    return math.inf if self._non_dp else self._pld.get_epsilon_for_delta(delta)

  def get_delta(self, epsilon: float) -> float:
    return 1.0 if self._non_dp else self._pld.get_delta_for_epsilon(epsilon)


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


def epsilon_of(
    events: Sequence[dp_accounting.DpEvent],
    delta: float,
    *,
    accountant: str,
    relation: clipping.NeighbouringRelation,
) -> float:
  """Epsilon at `delta` of the adaptive composition of `events`.

  Raises:
    UnsupportedAccountingError: the accountant cannot account these events
      as they ran.
  """
  check_delta(delta)
  if not events:
    return 0.0
  views = [untruncated_view(e) for e in events]
  counts = collections.Counter(v for v, _ in views)
  beta = sum(b for _, b in views)
  return _epsilon(tuple(counts.items()), beta, delta, accountant, relation)


@functools.lru_cache(maxsize=64)
def _epsilon(counts: tuple, beta: float, delta: float, accountant: str,
             relation: clipping.NeighbouringRelation) -> float:
  """`epsilon_of` of (untruncated event, count) pairs, memoised: a runner
  asks for the same history more than once per round (a budget check before
  it, the epsilon after it, a summary per accountant)."""
  if accountant == "pld":
    acc = _ComposedPld(
        [(_single_event_pld(e, relation), c) for e, c in counts])
  else:
    acc = make_accountant(accountant, relation)
    composed = _group(counts)
    if not acc.supports(composed):
      raise UnsupportedAccountingError(
          f"the rdp accountant cannot account these events under "
          f"{relation.value} neighbours")
    acc.compose(composed)
  return epsilon_with_truncation_slack(acc, delta, beta)


@dataclasses.dataclass
class LedgerEntry:
  round: int
  event: dp_accounting.DpEvent


class PrivacyLedger:
  """Records one DP event per released round and reports epsilon.

  Record a round's event before its result is released (logged, written or
  used): a round that has been computed must never go unaccounted.

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

  @property
  def entries(self) -> tuple[LedgerEntry, ...]:
    return tuple(self._entries)

  @property
  def events(self) -> list[dp_accounting.DpEvent]:
    return [e.event for e in self._entries]

  @property
  def num_rounds(self) -> int:
    return len(self._entries)

  def record(self, round_index: int, event: dp_accounting.DpEvent) -> None:
    """Adds round `round_index`'s event; each round may be recorded once."""
    if any(e.round == round_index for e in self._entries):
      raise ValueError(f"round {round_index} is already in the ledger")
    self._entries.append(LedgerEntry(int(round_index), event))

  def epsilon(self, accountant: str | None = None,
              delta: float | None = None) -> float:
    """Epsilon so far at `delta` (default: the ledger's)."""
    return epsilon_of(
        self.events, self.delta if delta is None else delta,
        accountant=accountant or self.accountant, relation=self.relation)

  def epsilon_if(self, event: dp_accounting.DpEvent,
                 accountant: str | None = None) -> float:
    """Epsilon the ledger would report after also recording `event`."""
    return epsilon_of(
        self.events + [event], self.delta,
        accountant=accountant or self.accountant, relation=self.relation)


def calibrate_noise_multiplier(
    make_event,
    *,
    target_epsilon: float,
    delta: float,
    rounds: int,
    accountant: str,
    relation: clipping.NeighbouringRelation,
    rel_tol: float = 1e-4,
) -> float:
  """Smallest noise multiplier z with epsilon(rounds x make_event(z)) <= target.

  Args:
    make_event: z -> the DP event of one round (a sampler's `dp_event`).
    target_epsilon: > 0.
    delta: in (0, 1).
    rounds: >= 1.
    accountant: "pld" or "rdp".
    relation: neighbouring relation of the events.
    rel_tol: relative tolerance on z.

  Returns:
    z such that epsilon <= target_epsilon, within rel_tol of the smallest.
  """
  if not target_epsilon > 0 or math.isinf(target_epsilon):
    raise ValueError(
        f"target_epsilon must be a finite number > 0, got {target_epsilon!r}")
  if rounds < 1:
    raise ValueError(f"rounds must be >= 1, got {rounds!r}")
  check_delta(delta)

  def eps(z):
    return epsilon_of([make_event(z)] * rounds, delta,
                      accountant=accountant, relation=relation)

  lo, hi = 0.0, 1.0
  while eps(hi) > target_epsilon:
    lo, hi = hi, hi * 2
    if hi > 1e6:
      raise ValueError(
          f"no noise multiplier up to 1e6 reaches epsilon={target_epsilon}")
  while hi - lo > rel_tol * hi:
    mid = 0.5 * (lo + hi)
    if eps(mid) > target_epsilon:
      lo = mid
    else:
      hi = mid
  return hi


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
  # pylint: disable-next=protected-access
  curve = np.asarray(acc._rdp, dtype=np.float64)
  a = np.asarray(orders, dtype=np.float64)
  return float(np.min(curve + math.log(1.0 / delta) / (a - 1.0)))
