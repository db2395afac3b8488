"""Epsilons computed ahead on a worker thread equal the ledger's."""

import functools

import pytest

from fedjax_dp import config as config_lib
from fedjax_dp import epsilon_reports
from fedjax_dp import simulation

_PLANS = {
    # Every round alike (truncated Poisson rounds, PLD).
    "poisson": {},
    # DP-FTRL: a tree's event when it starts, no-ops inside it (RDP).
    "tree": dict(mechanism="tree", sampling="disjoint", cohort_size=20,
                 noise_multiplier=1.0, target_epsilon=None, accountant="rdp",
                 sampling_probability=None, tree_restart_every=4),
    # Record-level DP: an example-level epsilon too.
    "dpsgd": dict(example_clip_norm=1.0, example_noise_multiplier=1.0),
}


@functools.cache
def _plan(name):
  config = config_lib.Config(rounds=12).replace(**_PLANS[name])
  return simulation.build(config).plan


def test_report_rounds_are_every_kth_and_the_last():
  assert list(epsilon_reports.report_rounds(0, 10, 3)) == [2, 5, 8, 9]
  assert list(epsilon_reports.report_rounds(4, 10, 3)) == [5, 8, 9]
  assert list(epsilon_reports.report_rounds(0, 3, 1)) == [0, 1, 2]
  assert list(epsilon_reports.report_rounds(0, 6, 3)) == [2, 5]


@pytest.mark.parametrize("name", sorted(_PLANS))
@pytest.mark.parametrize("first_round", [0, 3])
def test_reports_equal_the_ledger_after_those_rounds(name, first_round):
  plan = _plan(name)
  ledger = plan.new_ledger()
  for r in range(first_round):  # a resumed run's restored ledger
    ledger.record(r, plan.event(r))
  reports = epsilon_reports.EpsilonReports(
      plan, ledger, epsilon_reports.report_rounds(first_round, 12, 4))
  try:
    seen = []
    for r in range(first_round, 12):
      ledger.record(r, plan.event(r))
      if (r + 1) % 4 == 0 or r == 11:
        epsilon, example = reports.epsilon_after(r)
        # Bit for bit what the run's own ledger reports.
        assert epsilon == ledger.epsilon()
        assert example == plan.example_epsilon(r + 1)
        seen.append(epsilon)
  finally:
    reports.close()
  assert len(seen) == 3 and seen == sorted(seen) and seen[0] > 0


def test_asking_for_another_round_is_an_error():
  plan = _plan("poisson")
  reports = epsilon_reports.EpsilonReports(
      plan, plan.new_ledger(), epsilon_reports.report_rounds(0, 12, 4))
  try:
    with pytest.raises(ValueError, match="round 4 is not a report round"):
      reports.epsilon_after(4)
  finally:
    reports.close()


@pytest.mark.parametrize("name", ["poisson", "tree"])
def test_rounds_within_budget_stops_before_the_first_round_over_it(name):
  plan = _plan(name)
  ledger = plan.new_ledger()
  ledger.record(0, plan.event(0))
  eps = [epsilon_reports.ledger_after(plan, ledger, t).epsilon()
         for t in range(13)]
  # A budget between two consecutive distinct epsilons (the tree's stay
  # flat inside a tree).
  jumps = [t for t in range(2, 12) if eps[t] < eps[t + 1]]
  middle = jumps[len(jumps) // 2]
  for budget, allowed in [
      (eps[12] + 1.0, 12),  # the whole run fits
      ((eps[middle] + eps[middle + 1]) / 2, middle),
      (eps[1] / 2, 1)]:  # over budget already: no further round
    assert epsilon_reports.rounds_within_budget(
        plan, ledger, 12, budget) == allowed
