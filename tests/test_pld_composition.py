"""The PLD composition against dp_accounting's own arithmetic."""

import math

import dp_accounting
from dp_accounting import pld
from dp_accounting.pld import pld_pmf
import numpy as np
import pytest

from fedjax_dp.privacy import pld_composition

ADD_REMOVE = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE


def _pmf(probs, lower_loss=-3, interval=0.5, infinity_mass=0.0):
  return pld_pmf.DensePLDPmf(interval, lower_loss, np.asarray(probs, float),
                             infinity_mass, True)


_EVENTS = [
    dp_accounting.PoissonSampledDpEvent(0.125,
                                        dp_accounting.GaussianDpEvent(1.2)),
    dp_accounting.GaussianDpEvent(3.0),
    dp_accounting.LaplaceDpEvent(0.5),
]


@pytest.mark.parametrize("event", _EVENTS, ids=["poisson", "gauss", "laplace"])
@pytest.mark.parametrize("count", [1, 2, 40])
def test_epsilon_equals_dp_accountings_scan_bit_for_bit(event, count):
  composed = pld_composition.ComposedPld(((event, count),), ADD_REMOVE)
  for delta in (1e-3, 1e-5, 1e-10, 0.5):
    # dp_accounting's own PrivacyLossDistribution.get_epsilon_for_delta on
    # the same composition (a Python scan over every loss).
    assert composed.get_epsilon(delta) == \
        composed._pld.get_epsilon_for_delta(delta)  # pylint: disable=protected-access


@pytest.mark.parametrize("probs,infinity_mass,delta", [
    ([0.1, 0.2, 0.3, 0.4], 0.0, 1e-3),
    ([0.1, 0.2, 0.3, 0.4], 0.0, 0.9),  # epsilon 0
    ([0.25, 0.25, 0.25, 0.2], 0.05, 0.01),  # infinite loss above delta
    ([0.25, 0.25, 0.25, 0.2], 0.05, 0.05),  # exactly delta
    ([0.0, 0.0, 0.5, 0.5], 0.0, 1e-6),
    ([], 1e-7, 1e-6),  # only the infinite loss, below delta
])
def test_epsilon_edge_cases_equal_dp_accounting(probs, infinity_mass, delta):
  pmf = _pmf(probs, infinity_mass=infinity_mass)
  assert pld_composition.epsilon_for_delta(pmf, delta) == \
      pmf.get_epsilon_for_delta(delta)


def test_losses_too_large_for_exp_take_dp_accountings_early_return():
  # exp(-loss) underflows to 0 for the top losses: the scan returns the
  # loss at which the mass above reaches delta.
  pmf = _pmf([0.4, 0.3, 0.2, 0.1], lower_loss=800, interval=1.0)
  eps = pld_composition.epsilon_for_delta(pmf, 0.25)
  assert eps == pmf.get_epsilon_for_delta(0.25) == 802.0


@pytest.mark.parametrize("count", [2, 7, 30, 200])
def test_tail_bounds_hold_the_promised_mass(count):
  """The Chernoff bounds from the cached moment generating function leave
  at most TAIL_MASS / 2 on each side of the exact self-convolution."""
  rng = np.random.default_rng(0)
  probs = rng.dirichlet(np.full(50, 0.3))
  single = pld_composition._Pmf(_pmf(probs))  # pylint: disable=protected-access
  lower, upper = single.self_convolve_bounds(count)
  exact = probs
  for _ in range(count - 1):
    exact = np.convolve(exact, probs)
  # Mass far below float resolution cannot be checked; the bound is
  # checked where the exact convolution resolves it.
  resolution = 1e-15
  assert exact[:lower].sum() <= pld_composition.TAIL_MASS / 2 + resolution
  assert exact[upper + 1:].sum() <= pld_composition.TAIL_MASS / 2 + resolution
  assert 0 <= lower <= upper <= (probs.size - 1) * count


@pytest.mark.parametrize("event", _EVENTS[:2], ids=["poisson", "gauss"])
def test_composition_equals_dp_accountings_pld_accountant(event):
  acc = pld.PLDAccountant(neighboring_relation=ADD_REMOVE)
  acc.compose(event, 25)
  composed = pld_composition.ComposedPld(((event, 25),), ADD_REMOVE)
  for delta in (1e-5, 1e-8):
    # The two truncate the composition's tails at different points (both
    # count the cut mass as an infinite loss): equal to 1e-6, never below.
    theirs = acc.get_epsilon(delta)
    assert theirs <= composed.get_epsilon(delta) <= theirs * (1 + 1e-6)
  eps = acc.get_epsilon(1e-5)
  assert composed.get_delta(eps) == pytest.approx(acc.get_delta(eps),
                                                  rel=1e-6)


def test_events_without_a_pld_are_refused():
  event = dp_accounting.SampledWithoutReplacementDpEvent(
      100, 10, dp_accounting.GaussianDpEvent(1.0))
  with pytest.raises(pld_composition.UnsupportedEventError):
    pld_composition.ComposedPld(((event, 3),), ADD_REMOVE)
  non_dp = pld_composition.ComposedPld(
      ((dp_accounting.NonPrivateDpEvent(), 2),), ADD_REMOVE)
  assert non_dp.get_epsilon(1e-5) == math.inf
  assert non_dp.get_delta(1.0) == 1.0
