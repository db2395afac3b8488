"""The privacy cost of hyperparameter tuning (Papernot & Steinke 2022).

Privacy: see `tuning_epsilon`; the guarantee holds for the neighbouring
relation of the runs' samplers.
"""

import collections
import dataclasses
import math
from typing import Any, Sequence

import dp_accounting
from dp_accounting import dp_event
from dp_accounting import rdp
from dp_accounting.rdp import rdp_privacy_accountant
import numpy as np

from fedjax_dp.privacy import accounting

@dataclasses.dataclass
class TuningPrivacy:
  """Epsilon of releasing the best configuration of a random-size search.

  Attributes:
    epsilon: epsilon at `delta` of the repeat-and-select mechanism (RDP).
    delta: the delta.
    mean_num_runs: mean of the (Poisson) number of candidate runs.
    shape: dp_accounting's shape of that distribution (inf: Poisson).
    single_run_epsilon: epsilon of one run of the event used (RDP), for
      comparison with the per-configuration epsilons.
    all_released_epsilon: epsilon of releasing every configuration (the
      composition of all runs; RDP).
    event: the DpEvent accounted.
    note: which run's event was used and why.
  """

  epsilon: float
  delta: float
  mean_num_runs: float
  shape: float
  single_run_epsilon: float
  all_released_epsilon: float
  event: Any
  note: str

  def to_json(self) -> dict:
    d = dataclasses.asdict(self)
    d["event"] = repr(self.event)
    d["advice"] = self.advice()
    return d

  def advice(self) -> str:
    """Which release is cheaper, in words, and why."""
    if self.epsilon > self.all_released_epsilon:
      return (
          f"Releasing every configuration (epsilon "
          f"{self.all_released_epsilon:.4g}) costs less than releasing only "
          f"the best ({self.epsilon:.4g}): the selection's guarantee counts "
          f"a random number of runs (mean {self.mean_num_runs:g}), each as "
          "the least private configuration, while releasing them all counts "
          "each at its own cost. That happens when the configurations differ "
          "in privacy (a sweep over noise multipliers): release them all, "
          "or tune among configurations of the same noise.")
    return (
        f"Releasing only the best configuration (epsilon {self.epsilon:.4g})"
        f" costs less than releasing every one "
        f"({self.all_released_epsilon:.4g}).")


def _run_event(events: Sequence[dp_accounting.DpEvent]):
  """(one run's composed event without truncation, its truncation prob.)."""
  views = [accounting.untruncated_view(e) for e in events]
  counts = collections.Counter(v for v, _ in views)
  parts = [e if c == 1 else dp_accounting.SelfComposedDpEvent(e, c)
           for e, c in counts.items()]
  return dp_accounting.ComposedDpEvent(parts), sum(b for _, b in views)


def _rdp_accountant(relation, orders=None) -> rdp.RdpAccountant:
  return rdp.RdpAccountant(
      orders=None if orders is None else list(orders),
      neighboring_relation=accounting.dp_accounting_relation(relation))


def _rdp_curve(event, relation, orders) -> np.ndarray:
  acc = _rdp_accountant(relation, orders)
  if not acc.supports(event):
    raise accounting.UnsupportedAccountingError(
        f"the rdp accountant cannot account {event!r}")
  acc.compose(event)
  return np.asarray(acc.rdp, np.float64)


def _epsilon_with_slack(event, delta, beta, relation, orders) -> float:
  """RDP epsilon of `event`, widened for truncation (see accounting.py)."""
  acc = _rdp_accountant(relation, orders)
  if not acc.supports(event):
    raise accounting.UnsupportedAccountingError(
        f"the rdp accountant cannot account {event!r}")
  acc.compose(event)
  return accounting.epsilon_with_truncation_slack(acc, delta, beta)


def tuning_epsilon(
    per_config_events: Sequence[Sequence[dp_accounting.DpEvent]],
    delta: float,
    *,
    relation: accounting.Relation,
    mean_num_runs: float | None = None,
    shape: float = math.inf,
) -> TuningPrivacy:
  """Privacy cost of releasing only the best configuration of a search.

  Assumed procedure (Papernot & Steinke 2022, "Hyperparameter Tuning with
  Renyi Differential Privacy", ICLR; dp_accounting's
  `RepeatAndSelectDpEvent`): draw the number of candidate runs K at random,
  by default K ~ Poisson(mean = number of configurations) (`shape=inf`;
  `shape=1` is geometric, `0` logarithmic, other values truncated negative
  binomial); each candidate is a full training run with hyperparameters drawn
  independently and uniformly from the grid; release only the best candidate
  (its model and its hyperparameters), chosen by a score that is a function
  of the released model and data outside the protected population (e.g.
  held-out clients). Running the fixed grid once per point and publishing
  every result is a different mechanism: `all_released_epsilon` is its
  epsilon (the composition of every run).

  Privacy: the theorem needs every candidate to be the same mechanism. A
  candidate with random hyperparameters is a mixture of the configurations'
  runs, whose Renyi divergence at every order is at most the largest of
  theirs. So the event used is the run whose RDP curve dominates every other
  at every order (with different noise multipliers and equal rounds: the
  smallest z); if no single run dominates, the composition of the maximal
  runs is used instead, which is a valid, looser bound. Truncated Poisson
  rounds are accounted as in `privacy/accounting.py`, with the truncation
  probability multiplied by the mean number of runs. Guarantee for the
  neighbouring relation `relation` of the runs' samplers.

  Args:
    per_config_events: for each configuration, its ledger's events.
    delta: the delta at which epsilon is reported.
    relation: the runs' neighbouring relation.
    mean_num_runs: mean number of candidate runs; default the number of
      configurations. Must be >= 1.
    shape: shape of the distribution of the number of runs (see above).

  Returns:
    A TuningPrivacy.

  Raises:
    ValueError: no configurations, or mean_num_runs < 1.
    accounting.UnsupportedAccountingError: RDP cannot account the events.
  """
  accounting.check_delta(delta)
  runs = [_run_event(events) for events in per_config_events if events]
  if not runs:
    raise ValueError("tuning_epsilon needs at least one run with events")
  mean = float(len(per_config_events) if mean_num_runs is None
               else mean_num_runs)
  if not mean >= 1:
    raise ValueError(f"mean_num_runs must be >= 1, got {mean_num_runs!r}")
  # Runs with equal events are one candidate (and one RDP computation).
  distinct = {}
  for event, beta in runs:
    key = repr(event)
    count = distinct[key][2] + 1 if key in distinct else 1
    distinct[key] = (event, max(beta, distinct.get(key, (0, 0.0))[1]), count)
  candidates = list(distinct.values())
  # dp_accounting drops an order where its series fails to converge (the
  # value is then inf); an inf there would hide a run's true RDP, so only
  # orders where every run is finite are used (each order is computed
  # independently, so the others are unchanged).
  orders = np.asarray(rdp_privacy_accountant.DEFAULT_RDP_ORDERS, np.float64)
  curves = np.stack([_rdp_curve(e, relation, orders) for e, _, _ in candidates])
  finite = np.all(np.isfinite(curves), axis=0)
  orders, curves = orders[finite], curves[:, finite]
  upper = curves.max(axis=0)
  beta = max(b for _, b, _ in candidates)
  # `upper` is the elementwise max of these very arrays, so a dominating
  # curve equals it exactly.
  dominant = [i for i, c in enumerate(curves) if np.all(c >= upper)]
  if dominant:
    event = candidates[dominant[0]][0]
    note = (f"event of the run whose RDP curve dominates all "
            f"{len(candidates)} distinct runs at every order")
  else:
    maximal = [i for i, c in enumerate(curves)
               if not any(np.all(d >= c) and np.any(d > c)
                          for j, d in enumerate(curves) if j != i)]
    event = dp_accounting.ComposedDpEvent(
        [candidates[i][0] for i in maximal])
    note = (f"no single run dominates; composition of the {len(maximal)} "
            f"maximal runs used (a looser, valid bound)")
  single = _epsilon_with_slack(event, delta, beta, relation, orders)
  selected = dp_event.RepeatAndSelectDpEvent(event, mean, shape)
  epsilon = _epsilon_with_slack(selected, delta, mean * beta, relation,
                                orders)
  everything = dp_accounting.ComposedDpEvent(
      [e if c == 1 else dp_accounting.SelfComposedDpEvent(e, c)
       for e, _, c in candidates])
  all_released = _epsilon_with_slack(everything, delta,
                                     sum(b for _, b in runs), relation, orders)
  return TuningPrivacy(epsilon=epsilon, delta=delta, mean_num_runs=mean,
                       shape=shape, single_run_epsilon=single,
                       all_released_epsilon=all_released, event=event,
                       note=note)
