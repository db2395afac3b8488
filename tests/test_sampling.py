"""Samplers: what they draw matches the event they hand to the ledger."""

import dp_accounting
import jax
import numpy as np
import pytest
from scipy import stats

from fedjax_dp.privacy import clipping
from fedjax_dp.privacy import sampling


def _draws(sampler, rounds):
  fn = jax.jit(sampler.sample)
  return [jax.device_get(fn(jax.random.fold_in(jax.random.key(0), r)))
          for r in range(rounds)]


def test_poisson_inclusion_probability_and_counts():
  n, q, rounds = 200, 0.1, 400
  sampler = sampling.PoissonSampler(n, q)
  counts = np.zeros(n)
  sizes = []
  for indices, valid, num_drawn in _draws(sampler, rounds):
    chosen = indices[valid]
    assert len(np.unique(chosen)) == len(chosen)  # no client twice
    assert chosen.min(initial=0) >= 0 and chosen.max(initial=0) < n
    assert int(num_drawn) == int(valid.sum())  # never truncated here
    counts[chosen] += 1
    sizes.append(int(num_drawn))
  # Cohort sizes follow Binomial(n, q): chi-square-free check on mean and var
  # with 5-sigma tolerances from the sampling distribution of each.
  sizes = np.array(sizes)
  mean, var = n * q, n * q * (1 - q)
  assert abs(sizes.mean() - mean) < 5 * np.sqrt(var / rounds)
  assert abs(sizes.var() - var) < 5 * var * np.sqrt(2 / (rounds - 1))
  # Every client is included with probability q: a goodness-of-fit test of
  # the per-client inclusion counts against Binomial(rounds, q).
  expected = rounds * q
  chi2 = np.sum((counts - expected) ** 2 / (expected * (1 - q)))
  assert stats.chi2.sf(chi2, df=n) > 1e-3


def test_poisson_truncation_keeps_a_random_subset_of_capacity():
  sampler = sampling.PoissonSampler(100, 0.5, capacity=20)
  first_slots = []
  for indices, valid, num_drawn in _draws(sampler, 50):
    assert int(num_drawn) > 20  # always overflows at these settings
    assert valid.all() and len(np.unique(indices)) == 20
    first_slots.append(indices[0])
  # The kept subset is not biased toward low client indices.
  assert 25 < np.mean(first_slots) < 75


def test_poisson_event_matches_sampler():
  sampler = sampling.PoissonSampler(1000, 0.02, capacity=1000)
  assert sampler.relation is clipping.NeighbouringRelation.ADD_OR_REMOVE_ONE
  assert sampler.dp_event(1.3) == dp_accounting.PoissonSampledDpEvent(
      0.02, dp_accounting.GaussianDpEvent(1.3))
  assert sampler.expected_cohort_size == pytest.approx(20.0)
  small = sampling.PoissonSampler(1000, 0.02)  # automatic capacity
  assert small.capacity < 1000
  assert small.dp_event(1.3) == dp_accounting.TruncatedSubsampledGaussianDpEvent(
      dataset_size=1001, sampling_probability=0.02,
      truncated_batch_size=small.capacity, noise_multiplier=1.3)


def test_fixed_size_draws_exactly_m_distinct_uniformly():
  n, m, rounds = 50, 10, 500
  sampler = sampling.FixedSizeSampler(n, m)
  counts = np.zeros(n)
  for indices, valid, num_drawn in _draws(sampler, rounds):
    assert valid.all() and int(num_drawn) == m
    assert len(np.unique(indices)) == m
    counts[indices] += 1
  expected = rounds * m / n
  chi2 = np.sum((counts - expected) ** 2 / expected)
  assert stats.chi2.sf(chi2, df=n - 1) > 1e-3


def test_fixed_size_event_uses_replace_one_sensitivity():
  sampler = sampling.FixedSizeSampler(1000, 50)
  assert sampler.relation is clipping.NeighbouringRelation.REPLACE_ONE
  assert sampler.dp_event(2.0) == dp_accounting.SampledWithoutReplacementDpEvent(
      1000, 50, dp_accounting.GaussianDpEvent(1.0))
  assert sampler.expected_cohort_size == 50


@pytest.mark.parametrize("make,field", [
    (lambda: sampling.PoissonSampler(0, 0.1), "population_size"),
    (lambda: sampling.PoissonSampler(10, 0.0), "sampling_probability"),
    (lambda: sampling.PoissonSampler(10, 1.5), "sampling_probability"),
    (lambda: sampling.FixedSizeSampler(10, 11), "cohort_size"),
    (lambda: sampling.FixedSizeSampler(10, 0), "cohort_size"),
    (lambda: sampling.make_sampler("poisson", 10, cohort_size=20),
     "cohort_size"),
    (lambda: sampling.make_sampler("shuffle", 10, cohort_size=2), "sampling"),
    (lambda: sampling.PoissonSampler(10, 0.1).dp_event(-1.0),
     "noise_multiplier"),
])
def test_bad_sampler_arguments_name_the_field(make, field):
  with pytest.raises(ValueError, match=field):
    make()
