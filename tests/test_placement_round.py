"""Local and distributed noise as configurations of the compiled round."""

import functools
import math

import dp_accounting
from dp_accounting import pld
from dp_accounting import rdp
import jax
import numpy as np
import pytest
from scipy import stats

from fedjax_dp import client as client_lib
from fedjax_dp import config as config_lib
from fedjax_dp import runner
from fedjax_dp import server as server_lib
from fedjax_dp import simulation
from fedjax_dp.algorithms import dp_fedavg
from fedjax_dp.models import registry
from fedjax_dp.privacy import clipping
from fedjax_dp.privacy import placement
from fedjax_dp.privacy import secure_aggregation
from fedjax_dp.privacy import plan as plan_lib
from helpers import tiny_blocks

_MODEL = registry.get_model("mlp_2nn", (5,), 3, hidden=(100,))



def _block(clients=6, seed=0, valid=None):
  return tiny_blocks.cohort_block(clients, seed, valid)


@functools.lru_cache(maxsize=None)
def _compiled_round(chunk, round_kwargs):
  kwargs = dict(round_kwargs)
  layout = {k: kwargs.pop(k) for k in ("vmap_clients", "unroll_local_steps")
            if k in kwargs}
  return jax.jit(dp_fedavg.build_round(
      _MODEL, client_lib.client_optimizer("sgd"),
      server_lib.server_optimizer("sgd"), plan_lib.Privatizer.create(**kwargs),
      clients_per_chunk=chunk, **layout))


def _released_sum(block, *, client_lr=0.5, clip=1.0, z=0.0, denominator=4.0,
                  key=1, chunk=2, secagg=None, min_participants=1,
                  **round_kwargs):
  """The round's released (noisy) sum, read off the server step (SGD, lr 1)."""
  opt = server_lib.server_optimizer("sgd")
  params = _MODEL.init(jax.random.key(0))
  fn = _compiled_round(chunk, tuple(sorted(round_kwargs.items())))
  hp = dp_fedavg.RoundHparams.create(
      client_lr=client_lr, server_lr=1.0, clip_norm=clip, noise_multiplier=z,
      denominator=denominator, min_participants=min_participants)
  state, metrics = fn(server_lib.init(params, opt), block, hp,
                      jax.random.key(key), secagg=secagg)
  flat = np.concatenate([
      np.ravel(np.asarray(a, np.float64) - np.asarray(b, np.float64))
      for a, b in zip(jax.tree_util.tree_leaves(state.params),
                      jax.tree_util.tree_leaves(params))])
  return flat * denominator, metrics


def _variance_interval(n, sigma2, p=1e-6):
  """Two-sided chi-square interval for the sample variance of n draws."""
  lo, hi = stats.chi2.ppf([p / 2, 1 - p / 2], n)
  return sigma2 * lo / n, sigma2 * hi / n


@pytest.mark.parametrize("placement_name", ["central", "distributed", "local"])
def test_without_noise_every_placement_is_the_same_clipped_sum(
    placement_name):
  block = _block(valid=[1, 1, 1, 1, 0, 0])
  reference, _ = _released_sum(block, clip=0.3)
  got, metrics = _released_sum(block, clip=0.3,
                               noise_placement=placement_name)
  np.testing.assert_allclose(got, reference, atol=1e-5)
  # With noise 0 and clip inf: plain FedAvg's sum of deltas.
  unclipped, _ = _released_sum(block, clip=math.inf,
                               noise_placement=placement_name)
  assert np.linalg.norm(unclipped) > 1.0  # the clip above did bind
  assert float(metrics["fraction_clipped"]) == 1.0


@pytest.mark.parametrize("placement_name", ["distributed", "local"])
def test_one_more_client_moves_the_pre_noise_sum_by_at_most_c(
    placement_name):
  clip = 0.3
  four, _ = _released_sum(_block(valid=[1, 1, 1, 0, 0, 0]), clip=clip,
                          noise_placement=placement_name)
  five, _ = _released_sum(_block(valid=[1, 1, 1, 1, 0, 0]), clip=clip,
                          noise_placement=placement_name)
  change = np.linalg.norm(five - four)
  assert 0.5 * clip < change <= clip * (1 + 1e-4)


def test_local_noise_grows_with_the_number_of_reporting_clients():
  z, clip = 2.0, 0.5
  for valid in ([1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]):
    block = _block(valid=valid)
    clean, _ = _released_sum(block, client_lr=1e-30, clip=clip)
    noisy, metrics = _released_sum(block, client_lr=1e-30, clip=clip, z=z,
                                   noise_placement="local")
    k = sum(valid)
    noise = noisy - clean
    lo, hi = _variance_interval(noise.size, k * (z * clip) ** 2)
    assert lo < np.mean(noise ** 2) < hi
    assert float(metrics["noise_stddev"]) == pytest.approx(
        math.sqrt(k) * z * clip, rel=1e-5)
    assert stats.kstest(noise / (math.sqrt(k) * z * clip),
                        "norm").pvalue > 1e-4


def test_local_laplace_messages_carry_laplace_noise_of_scale_z_c():
  z, clip = 1.5, 0.5
  block = _block(valid=[1, 0, 0, 0, 0, 0])
  clean, _ = _released_sum(block, client_lr=1e-30, clip=clip,
                           mechanism="laplace")
  noisy, _ = _released_sum(block, client_lr=1e-30, clip=clip, z=z,
                           mechanism="laplace", noise_placement="local")
  noise = (noisy - clean) / (z * clip)
  assert stats.kstest(noise, "laplace").pvalue > 1e-4
  assert stats.kstest(noise / math.sqrt(2), "norm").pvalue < 1e-4


def test_distributed_shares_come_from_participants_sized_for_the_minimum():
  z, clip = 1.5, 0.5
  # n participants with shares of variance (z C)^2 / n_min: the sum has
  # (n / n_min) (z C)^2, the central amount when n = n_min.
  for valid, n_min in (([1, 0, 0, 0, 0, 0], 1), ([1, 1, 1, 1, 1, 1], 6),
                       ([1, 1, 1, 1, 1, 1], 3)):
    block = _block(valid=valid)
    clean, _ = _released_sum(block, client_lr=1e-30, clip=clip)
    noisy, metrics = _released_sum(block, client_lr=1e-30, clip=clip, z=z,
                                   noise_placement="distributed",
                                   min_participants=n_min)
    noise = noisy - clean
    n = sum(valid)
    lo, hi = _variance_interval(noise.size, (z * clip) ** 2 * n / n_min)
    assert lo < np.mean(noise ** 2) < hi
    assert int(metrics["num_participants"]) == n
    assert not bool(metrics["aggregation_aborted"])
    assert float(metrics["noise_stddev"]) == pytest.approx(
        z * clip * math.sqrt(n / n_min), rel=1e-6)
  # One share alone is a sixth of the central variance.
  one = placement.with_gaussian_share(
      {"w": np.zeros(20000, np.float32)}, True, True,
      placement.share_stddev(z, clip, 6), jax.random.key(3))["w"]
  lo, hi = _variance_interval(one.size, (z * clip) ** 2 / 6)
  assert lo < float(np.mean(np.square(one))) < hi


def test_below_the_minimum_the_aggregation_aborts_and_releases_nothing():
  block = _block(valid=[1, 1, 0, 0, 0, 0])
  for bits in (None, 24):
    kwargs = {}
    if bits:
      kwargs = dict(secure_aggregation_encoding=True,
                    secagg=_secagg(2.0 ** 8, 1.0, 0.5, 3, bits))
    released, metrics = _released_sum(
        block, clip=0.5, z=1.0, noise_placement="distributed",
        min_participants=3, **kwargs)
    assert bool(metrics["aggregation_aborted"])
    assert int(metrics["num_participants"]) == 2
    np.testing.assert_array_equal(released, 0.0)


@pytest.mark.parametrize("placement_name", ["distributed", "local"])
def test_unrolled_clients_release_the_same_sum_as_vmapped(placement_name):
  # vmap_clients=False traces each client of a chunk separately; the
  # per-slot noise keys and the sum must not change.
  block = _block(valid=[1, 1, 1, 1, 1, 0])
  vmapped, _ = _released_sum(block, clip=0.3, z=1.0,
                             noise_placement=placement_name)
  unrolled, _ = _released_sum(block, clip=0.3, z=1.0,
                              noise_placement=placement_name,
                              vmap_clients=False)
  np.testing.assert_allclose(unrolled, vmapped, atol=1e-5)


def test_unrolled_clients_secure_aggregation_sum_is_exactly_the_same():
  block = _block(valid=[1, 1, 1, 1, 1, 0])
  clip, scale = 0.3, 2.0 ** 12
  kwargs = dict(clip=clip, z=1.0, noise_placement="distributed",
                secure_aggregation_encoding=True,
                secagg=_secagg(scale, 1.0, clip, 6, 24))
  vmapped, _ = _released_sum(block, **kwargs)
  unrolled, _ = _released_sum(block, vmap_clients=False, **kwargs)
  # Integers summed modulo 2^32, then decoded: the same bits.
  np.testing.assert_array_equal(unrolled, vmapped)


def test_padding_slots_send_nothing_under_client_side_noise():
  z, clip = 1.0, 0.5
  block = _block(valid=[1, 1, 1, 0, 0, 0])
  # NaN data in padding slots must not reach the sum.
  block.features["x"][3:] = np.nan
  got, _ = _released_sum(block, z=0.0, noise_placement="distributed")
  assert np.all(np.isfinite(got))
  clean, _ = _released_sum(block, client_lr=1e-30, clip=clip)
  for name, n_min, variance in (("distributed", 3, 1.0), ("local", 1, 3.0)):
    noisy, _ = _released_sum(block, client_lr=1e-30, clip=clip, z=z,
                             noise_placement=name, min_participants=n_min)
    # Three participants' noise only: padding slots add no share.
    noise = noisy - clean
    lo, hi = _variance_interval(noise.size, variance * (z * clip) ** 2)
    assert lo < np.mean(noise ** 2) < hi, name


def _secagg(scale, z, clip, slots, bits):
  share = secure_aggregation.share_stddev(z, clip, scale, slots)
  return secure_aggregation.SecAggParams.create(
      scale=scale, share_stddev=share, bits=bits)


def test_secure_aggregation_with_enough_bits_is_the_sum_within_quantisation():
  block = _block(valid=[1, 1, 1, 1, 1, 0])
  clip, scale, slots = 0.3, 2.0 ** 12, 6
  reference, _ = _released_sum(block, clip=clip)
  got, metrics = _released_sum(
      block, clip=clip, noise_placement="distributed",
      secure_aggregation_encoding=True,
      secagg=_secagg(scale, 0.0, clip, slots, 24))
  # Each of the 6 slots rounds each coordinate by less than one step 1/s.
  assert np.max(np.abs(got - reference)) < slots / scale
  assert np.max(np.abs(got - reference)) > 0  # it did quantise
  assert int(metrics["secagg_wrapped"]) == 0
  assert int(metrics["secagg_near_overflow"]) == 0


def test_secure_aggregation_noise_has_the_central_variance():
  z, clip, scale = 1.0, 0.5, 2.0 ** 6
  block = _block(valid=[1, 1, 0, 0, 0, 0])
  clean, _ = _released_sum(block, client_lr=1e-30, clip=clip)
  noisy, metrics = _released_sum(
      block, client_lr=1e-30, clip=clip, z=z, noise_placement="distributed",
      secure_aggregation_encoding=True, min_participants=2,
      secagg=_secagg(scale, z, clip, 2, 24))
  noise = noisy - clean
  # Two participants' discrete Gaussian shares, each sized for a minimum of
  # two participants (variance ~ (z C s)^2 / 2), plus rounding (variance <
  # 1/4 per client, in integer units); the padding slots send nothing.
  sigma2 = (z * clip) ** 2
  lo, _ = _variance_interval(noise.size, sigma2)
  _, hi = _variance_interval(noise.size, sigma2 + 2 * 0.25 / scale ** 2)
  assert lo < np.mean(noise ** 2) < hi
  assert int(metrics["secagg_sampler_failures"]) == 0


def test_secure_aggregation_with_too_few_bits_reports_the_wrap_around():
  block = _block(valid=[1, 1, 1, 1, 1, 1])
  clip, scale = 1.0, 2.0 ** 12
  reference, _ = _released_sum(block, clip=clip)
  got, metrics = _released_sum(
      block, clip=clip, noise_placement="distributed",
      secure_aggregation_encoding=True,
      secagg=_secagg(scale, 0.0, clip, 6, 6))
  assert int(metrics["secagg_wrapped"]) > 0
  assert int(metrics["secagg_near_overflow"]) > 0
  wrong = np.abs(got - reference) > 6 / scale
  assert 0 < np.sum(wrong)


@pytest.mark.slow
def test_runner_reports_secure_aggregation_wrap_around(tmp_path):
  lines = []
  config = config_lib.Config(
      rounds=2, cohort_size=10, eval_every=2, noise_placement="distributed",
      secagg_bits=8, secagg_scale=2.0 ** 13, accountant="rdp",
      noise_multiplier=1.0, client_lr=0.5)
  result = runner.run(config, progress=False, log=lines.append)
  assert result.summary["secagg_wrapped"] > 0
  assert any("wrapped around" in line for line in lines)


def test_local_run_ledger_is_the_per_client_gaussian_of_z_over_2():
  config = config_lib.Config(rounds=3, cohort_size=10, eval_every=3,
                             noise_placement="local", noise_multiplier=4.0)
  result = runner.run(config, progress=False, log=lambda s: None)
  assert result.ledger.relation is clipping.NeighbouringRelation.LOCAL
  acc = pld.PLDAccountant(dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
  acc.compose(dp_accounting.GaussianDpEvent(2.0), 3)
  assert result.summary["epsilon"] == pytest.approx(
      acc.get_epsilon(config.delta), rel=1e-6)
  # The Gaussian mechanism with sensitivity 2C and std z C, by hand (Balle &
  # Wang 2018): delta(eps) for mu = 2 / z per round, composed: mu sqrt(3).
  mu = math.sqrt(3) * 2 / 4.0
  eps = result.summary["epsilon"]
  delta = stats.norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * stats.norm.cdf(
      -eps / mu - mu / 2)
  assert delta == pytest.approx(config.delta, rel=0.05)


def test_secure_aggregation_run_fits_its_bits_and_records_the_ddg_event():
  config = config_lib.Config(
      rounds=2, cohort_size=10, eval_every=2, noise_placement="distributed",
      secagg_bits=20, accountant="rdp", noise_multiplier=1.0)
  result = runner.run(config, progress=False, log=lambda s: None)
  summary = result.summary
  assert summary["secagg_wrapped"] == 0
  assert summary["secagg_near_overflow"] == 0
  # The scale is the largest power of two that fits the most shares a
  # round can have (the block): twice it would not.
  sim = simulation.build(config)
  assert sim.plan.secagg.scale == summary["secagg_scale"]
  assert math.log2(sim.plan.secagg.scale).is_integer()
  n_max, n_min, c = sim.plan.secagg.max_shares, sim.plan.secagg.min_shares, \
      config.clip_norm
  assert n_max == sim.slots and n_min == sim.plan.min_participants
  twice = 2 * sim.plan.secagg.scale
  assert secure_aggregation.required_bits(
      n_max, c, twice,
      secure_aggregation.share_stddev(1.0, c, twice, n_min)) > 20
  (event,) = set(result.ledger.events)
  assert isinstance(event, dp_accounting.ZCDpEvent)
  assert result.ledger.relation is clipping.NeighbouringRelation.REPLACE_SPECIAL
  acc = rdp.RdpAccountant(
      neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_SPECIAL)
  acc.compose(event, 2)
  assert result.summary["epsilon"] == pytest.approx(
      acc.get_epsilon(config.delta), rel=1e-6)
  # Kairouz et al. 2021's rho, by hand: D = s C + sqrt(d) (zero-out
  # neighbours: the participants are known, whatever the sampler), shares
  # sized for n_min participants (n_min sigma_c^2 = (z C s)^2), the worst
  # case at the fewest participants, tau negligible at these sigma_c.
  d = sum(x.size for x in jax.tree_util.tree_leaves(
      sim.model.init(jax.random.key(0))))
  s, c = result.summary["secagg_scale"], config.clip_norm
  assert event.rho == pytest.approx(
      0.5 * ((s * c + math.sqrt(d)) / (1.0 * c * s)) ** 2, rel=1e-6)


def test_distributed_run_records_the_zero_out_gaussian_without_amplification():
  config = config_lib.Config(rounds=3, cohort_size=10, eval_every=3,
                             noise_placement="distributed",
                             noise_multiplier=2.0)
  result = runner.run(config, progress=False, log=lambda s: None)
  assert result.ledger.relation is clipping.NeighbouringRelation.REPLACE_SPECIAL
  assert set(result.ledger.events) == {dp_accounting.GaussianDpEvent(2.0)}
  # The default minimum: a round aborts with probability <= 1% (Poisson
  # cohort of 10 expected: Binomial(N, q)'s 1% quantile).
  sim = simulation.build(config)
  n, q = sim.plan.sampler.population_size, sim.plan.sampler.sampling_probability
  assert stats.binom.cdf(sim.plan.min_participants - 1, n, q) <= 0.01
  assert stats.binom.cdf(sim.plan.min_participants, n, q) > 0.01
  for m in result.history:
    assert m["aggregation_aborted"] == (m["num_participants"] <
                                        sim.plan.min_participants)
