"""Matrix-factorization noise (BandMF, BLT): streaming form, covariance,
sensitivity under participation schemas, and the ledger's events."""

import itertools
import math

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_dp import config as config_lib
from fedjax_dp import simulation
from fedjax_dp.privacy import accounting
from fedjax_dp.privacy import clipping
from fedjax_dp.privacy import correlated_noise as cn
from fedjax_dp.privacy import plan as plan_lib
from helpers import contract as ct

BANDED = [cn.BandedToeplitz((1.0,)), cn.BandedToeplitz((0.8, 0.6)),
          cn.BandedToeplitz((0.6, 0.5, 0.4, 0.3, 0.2))]
BLTS = [cn.BufferedInverse((0.9, 0.5), (0.2, -0.3)),
        cn.BufferedInverse((1.0,), (-0.4,))]
STRATEGIES = BANDED + BLTS
TEMPLATE = {"a": jnp.zeros((3, 2)), "b": jnp.zeros((5,))}


def _stream(strategy, steps, key, stddev=1.0, template=TEMPLATE):
  """The strategy's outputs for `steps` rounds, each flattened: [T, d]."""
  noise = jax.jit(strategy.noise)
  state = strategy.init(key, template)
  out = []
  for _ in range(steps):
    w, state = noise(state, template, jnp.float32(stddev))
    out.append(np.concatenate([np.ravel(x) for x in
                               jax.tree_util.tree_leaves(w)]))
  return np.stack(out).astype(np.float64)


def _draws(key, steps, template=TEMPLATE):
  """The z_t the strategies draw (sigma = 1), flattened: [T, d]."""
  return np.stack([np.concatenate([np.ravel(x) for x in cn._standard_normal(  # pylint: disable=protected-access
      key, jnp.int32(t), template)[1]]) for t in range(steps)])


@pytest.mark.parametrize("strategy", STRATEGIES, ids=str)
def test_streaming_noise_is_c_inverse_times_the_draws(strategy):
  steps, key = 9, jax.random.key(4)
  got = _stream(strategy, steps, key, stddev=2.5)
  c_inv = cn.toeplitz_matrix(strategy.noise_coefs(steps))
  np.testing.assert_allclose(got, 2.5 * c_inv @ _draws(key, steps),
                             rtol=0, atol=1e-5)
  # And C applied to it gives the draws back: the release C x + Z.
  c = cn.toeplitz_matrix(strategy.strategy_coefs(steps))
  np.testing.assert_allclose(c @ c_inv, np.eye(steps), atol=1e-12)


@pytest.mark.parametrize("strategy", [BANDED[2], BLTS[0]], ids=str)
def test_the_compiled_rounds_noise_has_the_strategys_covariance(strategy):
  """Releases of a zero sum through the privatizer (the round's code path)
  over T rounds: their covariance across rounds is sigma^2 C^-1 C^-T."""
  steps, d, sigma = 5, 40_000, 0.7
  privatizer = plan_lib.Privatizer(noise=plan_lib.Noise.BAND_MF,
                                   correlated=strategy)
  template = {"w": jnp.zeros((d,))}
  state = plan_lib.PrivacyState(
      correlated=strategy.init(jax.random.key(1), template))

  @jax.jit
  def release(state):
    noisy, state, _ = privatizer.release(
        template, None, None, jnp.float32(sigma), None, None,
        jax.random.key(0), state, None)
    return noisy["w"], state

  rows = []
  for _ in range(steps):
    w, state = release(state)
    rows.append(np.asarray(w, np.float64))
  got = np.cov(np.stack(rows))
  c_inv = cn.toeplitz_matrix(strategy.noise_coefs(steps))
  want = sigma ** 2 * c_inv @ c_inv.T
  # Each entry's estimate over d i.i.d. coordinates has standard error
  # sqrt((S_ss S_tt + S_st^2) / d); 6 of those.
  se = np.sqrt((np.outer(np.diag(want), np.diag(want)) + want ** 2) / d)
  assert np.all(np.abs(got - want) < 6 * se), (got, want)


def _brute_force(coefs, k, b, signed=False):
  """max ||C u||^2 over 0/1 patterns of at most k rounds, b apart; with
  `signed`, over patterns with signs (scalar updates in [-1, 1] reach their
  extremes at +-1): what a client can do in one coordinate."""
  n = len(coefs)
  c = cn.toeplitz_matrix(coefs)
  best = 0.0
  for m in range(1, k + 1):
    for rounds in itertools.combinations(range(n), m):
      if all(j - i >= b for i, j in zip(rounds, rounds[1:])):
        for signs in itertools.product(
            (1.0, -1.0) if signed else (1.0,), repeat=m):
          v = c[:, list(rounds)] @ np.asarray(signs)
          best = max(best, float(v @ v))
  return best


def test_sensitivity_is_exact_where_proven_and_an_upper_bound_elsewhere():
  rng = np.random.default_rng(0)
  for _ in range(40):
    n, b, k = int(rng.integers(3, 9)), int(rng.integers(1, 4)), int(
        rng.integers(1, 4))
    monotone = np.sort(rng.uniform(0, 1, n))[::-1] + 0.05
    assert cn.minsep_sensitivity_squared(monotone, k, b) == pytest.approx(
        _brute_force(monotone, k, b), rel=1e-12)
    banded = np.zeros(n)
    banded[:min(b, n)] = rng.normal(size=min(b, n))
    banded[0] = abs(banded[0]) + 0.1
    assert cn.minsep_sensitivity_squared(banded, k, b) == pytest.approx(
        _brute_force(banded, k, b, signed=True), rel=1e-12)
    for coefs in (rng.uniform(0, 1, n) + 0.01, rng.normal(size=n)):
      coefs[0] = abs(coefs[0]) + 0.1
      assert cn.minsep_sensitivity_squared(coefs, k, b) >= (
          _brute_force(coefs, k, b, signed=True) * (1 - 1e-12))


def test_sensitivity_agrees_with_jax_privacy_on_optimised_strategies():
  from jax_privacy.matrix_factorization import toeplitz  # pylint: disable=g-import-not-at-top
  steps = 24
  band = cn.band_mf(steps, 4)
  assert band.bands == 4
  assert sum(c * c for c in band.coefs) == pytest.approx(1.0, rel=1e-6)
  for b, k in ((4, None), (6, 2), (2, None), (3, 3)):
    with jax.enable_x64(True):
      want = float(toeplitz.minsep_sensitivity_squared(
          jnp.asarray(band.strategy_coefs(steps)), b, k, steps))
    assert cn.sensitivity_squared(band, steps, k, b) == pytest.approx(
        want, rel=1e-9)
  # Bands within the separation: every participation's column has norm 1.
  assert cn.sensitivity_squared(band, steps, None, 4) == pytest.approx(
      6.0, rel=1e-6)


def _plan(**changes):
  config = ct.config_for("plain", "band_mf", noise_multiplier=1.3,
                         **changes)
  return simulation.build(config, ct.dataset_of(
      ct.ordinary_population())).plan


def test_cyclic_band_mf_records_one_gaussian_of_the_schemas_sensitivity():
  plan = _plan(rounds=7, min_separation=3, cohort_size=4, mf_bands=2)
  s = plan.schema_sensitivity_squared()
  # k = ceil(7 / 3) = 3 participations of columns that do not overlap.
  assert plan.sampler.max_participations == 3
  assert s == pytest.approx(sum(
      sum(c * c for c in plan.strategy.coefs[:7 - t]) for t in (0, 3, 6)))
  events = [plan.event(r) for r in range(7)]
  assert events[0] == dp_accounting.GaussianDpEvent(1.3 / math.sqrt(s))
  assert all(isinstance(e, dp_accounting.NoOpDpEvent) for e in events[1:])
  assert plan.relation is clipping.NeighbouringRelation.REPLACE_SPECIAL
  want = accounting.epsilon_of_counts(
      [(dp_accounting.GaussianDpEvent(1.3 / math.sqrt(s)), 1)], plan.delta,
      accountant=plan.accountant, relation=plan.relation)
  assert plan.planned_epsilon() == pytest.approx(want, rel=1e-9)


def test_banded_poisson_band_mf_is_amplified_once_per_cycle():
  plan = _plan(rounds=10, sampling="banded_poisson", min_separation=4,
               cohort_size=None, sampling_probability=0.5, mf_bands=4,
               capacity=None)
  assert plan.amplified
  column = math.sqrt(sum(c * c for c in plan.strategy.coefs))
  sampled = dp_accounting.PoissonSampledDpEvent(
      0.5, dp_accounting.GaussianDpEvent(1.3 / column))
  for r in range(10):
    want = sampled if r % 4 == 0 else dp_accounting.NoOpDpEvent()
    assert plan.event(r) == want
  # Three cycles of dp_accounting's sampled Gaussian, nothing else.
  rdp = dp_accounting.rdp.RdpAccountant(
      neighboring_relation=accounting.dp_accounting_relation(plan.relation))
  rdp.compose(sampled, 3)
  planned = plan_lib.dataclasses.replace(plan, accountant="rdp")
  assert planned.planned_epsilon() == pytest.approx(
      rdp.get_epsilon(plan.delta), rel=1e-9)
  # More bands than groups: no amplification, the schema's Gaussian.
  wide = _plan(rounds=10, sampling="banded_poisson", min_separation=2,
               cohort_size=None, sampling_probability=0.5, mf_bands=4,
               capacity=None)
  assert not wide.amplified
  assert wide.event(0) == dp_accounting.GaussianDpEvent(
      1.3 / math.sqrt(wide.schema_sensitivity_squared()))


def test_a_client_moves_the_whole_release_by_at_most_the_schemas_bound():
  """The neighbouring-data test over a run: a worst-case client (inputs of
  1e3, clipped to exactly C) in every round the cyclic sampler gives it;
  the rounds' differences Delta (T x d) with and without its data, each at
  the run's state, satisfy ||C Delta||_F <= C sqrt(s)."""
  case = ct.Case("plain", "band_mf", rounds=6, min_separation=2,
                 cohort_size=3)
  plan = case.sim.plan
  population = ct.ordinary_population()
  cohorts = [np.asarray(plan.sampler.sample_round(case.streams.sample, r)[0])
             for r in range(plan.num_rounds)]
  # The sampler does not read the data: the target is the client it takes
  # most often.
  target = int(np.argmax(np.bincount(np.concatenate(cohorts))))
  population[target] = ct.client_data("large", np.random.default_rng(1))
  rounds_in, deltas = [], []
  state = case.sim.initial_state(0)
  for r, indices in enumerate(cohorts):
    cohort = [population[int(i)] for i in np.asarray(indices)]
    with_target = case.release(case.block(cohort), state=state)
    if target in np.asarray(indices):
      rounds_in.append(r)
      without = [ct.client_data("empty", np.random.default_rng(0))
                 if int(i) == target else population[int(i)]
                 for i in np.asarray(indices)]
      deltas.append(with_target - case.release(case.block(without),
                                               state=state))
    else:
      deltas.append(np.zeros_like(with_target))
  assert len(rounds_in) >= 2
  assert all(j - i >= 2 for i, j in zip(rounds_in, rounds_in[1:]))
  assert len(rounds_in) <= plan.sampler.max_participations
  c = cn.toeplitz_matrix(plan.strategy.strategy_coefs(plan.num_rounds))
  moved = np.linalg.norm(c @ np.stack(deltas))
  bound = ct.CLIP * math.sqrt(plan.schema_sensitivity_squared())
  assert moved <= bound * (1 + 1e-5)
  # The large client is clipped to exactly C in each of its rounds.
  for r in rounds_in:
    assert np.linalg.norm(deltas[r]) == pytest.approx(ct.CLIP, rel=1e-4)


@pytest.mark.parametrize("mechanism", [
    "band_mf", pytest.param("blt", marks=pytest.mark.slow)])
def test_a_run_with_matrix_factorization_noise_trains_and_accounts(
    mechanism, tmp_path):
  from fedjax_dp import runner  # pylint: disable=g-import-not-at-top
  config = config_lib.Config(
      rounds=6, mechanism=mechanism, sampling="cyclic", min_separation=3,
      cohort_size=10, noise_multiplier=0.8, accountant="rdp", eval_every=6,
      blt_buffers=2)
  result = runner.run(config, run_dir=tmp_path / "run", progress=False)
  assert result.rounds_completed == 6
  assert result.summary["epsilon"] == pytest.approx(
      result.ledger.epsilon(), rel=1e-12)
  sim = simulation.build(config)
  assert result.summary["epsilon"] == pytest.approx(
      sim.plan.planned_epsilon(), rel=1e-9)
  assert 0.0 < result.summary["epsilon"] < math.inf


@pytest.mark.parametrize("mechanism", ["band_mf", "blt"])
def test_a_privatizer_without_its_strategy_is_refused(mechanism):
  """Never silently independent noise: the strategy comes from the plan."""
  with pytest.raises(ValueError, match="strategy"):
    plan_lib.Privatizer.create(mechanism=mechanism)
  with pytest.raises(ValueError, match="strategy"):
    plan_lib.Privatizer(noise=plan_lib.Noise(mechanism))
  with pytest.raises(ValueError, match="strategy"):
    plan_lib.Privatizer(noise=plan_lib.Noise.TREE)
