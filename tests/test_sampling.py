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


def _participations(sampler, rounds, key):
  """client -> the rounds it took part in."""
  seen = {}
  for r in range(rounds):
    indices, valid, _ = sampler.sample_round(key, r)
    for i in np.asarray(indices)[np.asarray(valid)]:
      seen.setdefault(int(i), []).append(r)
  return seen


def test_cyclic_schema_min_separation_and_at_most_k():
  n, m, rounds, b = 53, 4, 40, 6
  sampler = sampling.make_sampler("cyclic", n, cohort_size=m,
                                  num_rounds=rounds, min_separation=b)
  assert sampler.relation is clipping.NeighbouringRelation.REPLACE_SPECIAL
  assert sampler.max_participations == 7  # ceil(40 / 6)
  key = jax.random.key(2)
  for r in range(rounds):
    indices, valid, drawn = sampler.sample_round(key, r)
    assert len(np.unique(np.asarray(indices))) == m and bool(valid.all())
  seen = _participations(sampler, rounds, key)
  for taken in seen.values():
    assert len(taken) <= sampler.max_participations
    assert all(j - i >= b and (j - i) % b == 0
               for i, j in zip(taken, taken[1:]))
  # Groups of floor(53 / 6) = 8 clients; cohorts of 4 over 6 or 7 cycles
  # reach most of them (the 5 left over never take part).
  assert len(seen) <= b * sampler.group_size
  assert len(seen) > 0.8 * b * sampler.group_size


def test_cyclic_cohorts_are_uniform_within_a_group():
  n, m, b, cycles = 30, 2, 3, 3000
  sampler = sampling.CyclicSampler(n, m, b * cycles, b)
  key = jax.random.key(7)
  counts = np.zeros(n)
  for r in range(0, b * cycles, b):  # group 0's rounds
    indices, _, _ = sampler.sample_round(key, r)
    counts[np.asarray(indices)] += 1
  group = counts > 0
  assert group.sum() == sampler.group_size
  expected = cycles * m / sampler.group_size
  chi2 = np.sum((counts[group] - expected) ** 2 / expected)
  assert stats.chi2.sf(chi2, df=sampler.group_size - 1) > 1e-3


def test_banded_poisson_groups_inclusion_and_separation():
  n, q, rounds, b = 400, 0.3, 24, 4
  sampler = sampling.make_sampler("banded_poisson", n,
                                  sampling_probability=q, num_rounds=rounds,
                                  min_separation=b)
  assert sampler.relation is clipping.NeighbouringRelation.ADD_OR_REMOVE_ONE
  assert sampler.expected_cohort_size == pytest.approx(q * n / b)
  key = jax.random.key(5)
  groups = np.asarray(sampler.groups(key))
  # Balls in bins: group sizes ~ Multinomial(n, 1/b).
  sizes = np.bincount(groups, minlength=b)
  chi2 = np.sum((sizes - n / b) ** 2 / (n / b))
  assert stats.chi2.sf(chi2, df=b - 1) > 1e-3
  included = 0
  eligible = 0
  for r in range(rounds):
    indices, valid, drawn = sampler.sample_round(key, r)
    chosen = np.asarray(indices)[np.asarray(valid)]
    assert len(chosen) == int(drawn)
    assert np.all(groups[chosen] == r % b)
    included += len(chosen)
    eligible += int(np.sum(groups == r % b))
  # Within the round's group each client is in with probability q: 6 sigma.
  assert abs(included / eligible - q) < 6 * np.sqrt(q * (1 - q) / eligible)
  for taken in _participations(sampler, rounds, key).values():
    assert len(taken) <= sampler.max_participations
    assert all(j - i >= b for i, j in zip(taken, taken[1:]))
  assert sampler.dp_event(1.1) == dp_accounting.PoissonSampledDpEvent(
      q, dp_accounting.GaussianDpEvent(1.1))


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
    (lambda: sampling.CyclicSampler(10, 4, 8, 3), "cohort_size"),
    (lambda: sampling.CyclicSampler(10, 1, 8, 0), "min_separation"),
    (lambda: sampling.make_sampler("cyclic", 10, cohort_size=2),
     "min_separation"),
    (lambda: sampling.BandedPoissonSampler(10, 0.0, 8, 2),
     "sampling_probability"),
])
def test_bad_sampler_arguments_name_the_field(make, field):
  with pytest.raises(ValueError, match=field):
    make()
