"""Distributed discrete Gaussian with simulated SecAgg."""

import math

import chex
import dp_accounting
from dp_accounting import rdp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from fedjax_dp.privacy import accounting
from fedjax_dp.privacy import clipping
from fedjax_dp.privacy import secure_aggregation as sa

ZERO_OUT = clipping.NeighbouringRelation.REPLACE_SPECIAL
# Compiled once per shape: the eager while_loop is slow.

def _encode_sum_decode(stacked, valid, params, key,
                       max_trials=sa.DEFAULT_MAX_TRIALS):
  """Every slot's message (slot i keyed fold_in(key, i)), their modular sum,
  decoded: what a round does with its slots' updates."""
  num = valid.shape[0]
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(num))
  finite = jax.vmap(lambda u: jnp.all(jnp.stack([
      jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(u)])))(
          stacked)
  messages, failures = jax.vmap(sa.encode, in_axes=(0, 0, 0, None, 0, None))(
      stacked, valid, finite, params, keys, max_trials)
  return sa.decode(sa.modular_sum(messages), params), jnp.sum(failures)


_aggregate = jax.jit(_encode_sum_decode, static_argnames=("max_trials",))
_sample_dg = jax.jit(sa.sample_discrete_gaussian,
                     static_argnames=("shape", "max_trials"))


def _chi_square_pvalue(samples, pmf_fn, min_expected=5.0):
  """Chi-square of integer samples against a pmf; tails merged into 2 bins."""
  n = samples.size
  lo, hi = -1, 1
  while n * pmf_fn(np.array([lo - 1]))[0] >= min_expected:
    lo -= 1
  while n * pmf_fn(np.array([hi + 1]))[0] >= min_expected:
    hi += 1
  support = np.arange(lo, hi + 1)
  probs = pmf_fn(support)
  left, right = (1 - probs.sum()) / 2, (1 - probs.sum()) / 2  # symmetric
  observed = np.array([np.sum(samples < lo)]
                      + [np.sum(samples == k) for k in support]
                      + [np.sum(samples > hi)])
  expected = n * np.concatenate([[left], probs, [right]])
  return stats.chisquare(observed, expected).pvalue


@pytest.mark.parametrize("sigma", [0.5, 1.0, 3.0])
def test_discrete_gaussian_matches_exact_pmf(sigma):
  n = 200_000
  y, failures = _sample_dg(jax.random.key(0), sigma, (n,))
  y = np.asarray(y)
  assert int(failures) == 0
  pmf = lambda k: sa.discrete_gaussian_pmf(sigma, k)
  # Fails by accident with probability 1e-3.
  assert _chi_square_pvalue(y, pmf) > 1e-3
  support = np.arange(-60, 61)
  exact_var = float(np.sum(support ** 2 * pmf(support)))
  # Mean 0 and the exact variance (~sigma^2 for sigma >= 1), 5 std errors.
  assert abs(y.mean()) < 5 * math.sqrt(exact_var / n)
  se_var = exact_var * math.sqrt(2.0 / n) * 1.2  # kurtosis slack
  assert abs(y.var() - exact_var) < 5 * se_var
  if sigma >= 1:
    assert exact_var == pytest.approx(sigma ** 2, rel=1e-3)
  # Power: a 5% larger sigma is rejected; at small sigma so is a rounded
  # continuous Gaussian (at sigma = 3 the two are nearly the same law).
  wider, _ = _sample_dg(jax.random.key(1), 1.05 * sigma, (n,))
  assert _chi_square_pvalue(np.asarray(wider), pmf) < 1e-6
  if sigma <= 1:
    rounded = np.round(np.random.default_rng(0).normal(0, sigma, n))
    assert _chi_square_pvalue(rounded, pmf) < 1e-6


def test_discrete_laplace_matches_exact_pmf():
  t, n = 3.0, 200_000
  y = np.asarray(sa.sample_discrete_laplace(jax.random.key(1), t, (n,)))
  a = 1.0 / t
  pmf = lambda k: np.tanh(a / 2) * np.exp(-a * np.abs(k))
  assert _chi_square_pvalue(y, pmf) > 1e-3


def test_discrete_gaussian_zero_sigma_and_large_sigma():
  y, f = _sample_dg(jax.random.key(2), 0.0, (100_000,))
  np.testing.assert_array_equal(y, 0)
  assert int(f) == 0
  y, f = _sample_dg(jax.random.key(2), 1000.0, (100_000,))
  y = np.asarray(y, np.float64)
  assert int(f) == 0
  assert abs(y.std() / 1000.0 - 1) < 5 / math.sqrt(2 * 100_000)
  # Integers, as sent (no float rounding of large values).
  assert np.all(y == np.round(y))


def test_stochastic_rounding_is_unbiased_and_within_one():
  x = jnp.array([0.25, -1.7, 3.5, 0.0, 2.0, -0.999])
  n = 20_000
  r = np.asarray(jax.vmap(lambda k: sa.stochastic_round(x, k))(
      jax.random.split(jax.random.key(3), n)))
  xs = np.asarray(x, np.float64)
  assert np.all(np.abs(r - xs) < 1)
  assert np.all((r == np.floor(xs)) | (r == np.ceil(xs)))
  # Mean within 5 standard errors (Bernoulli std <= 1/2).
  assert np.all(np.abs(r.mean(0) - xs) < 5 * 0.5 / math.sqrt(n))
  # Integers stay put.
  np.testing.assert_array_equal(r[:, [3, 4]], np.array([[0, 2]] * n))


def _clipped_updates(key, n, d, c):
  u = jax.random.normal(key, (n, d))
  norms = jnp.linalg.norm(u, axis=1, keepdims=True)
  return u * jnp.minimum(1.0, c / norms)


def test_enough_bits_recovers_sum_within_quantisation_bound():
  n, d, c, s = 20, 64, 1.0, 2.0 ** 10
  u = _clipped_updates(jax.random.key(4), n, d, c)
  bits = sa.required_bits(n, c, s, 0.0)
  sa.check_params(n, c, s, 0.0, bits)
  params = sa.SecAggParams.create(scale=s, share_stddev=0.0, bits=bits)
  res, failures = _aggregate({"w": u}, jnp.ones(n, bool), params,
                               jax.random.key(5))
  err = np.abs(np.asarray(res.sum["w"], np.float64)
               - np.asarray(u, np.float64).sum(0))
  # Deterministic bound: n roundings, each moves by < 1 / s.
  assert err.max() < n / s
  # Typical size: each rounding has variance <= 1 / (4 s^2).
  assert np.sqrt(np.mean(err ** 2)) <= math.sqrt(n) / (2 * s) * 1.2
  assert int(res.num_wrapped) == 0
  assert int(res.num_near_overflow) == 0
  assert int(failures) == 0


def test_padding_slots_send_nothing():
  n, d, s = 6, 20_000, 2.0 ** 8
  u = jnp.ones((n, d)) * 0.1
  valid = jnp.array([True, True, True, False, False, False])
  u = u.at[3:].set(jnp.nan)
  params = sa.SecAggParams.create(scale=s, share_stddev=0.0, bits=20)
  res, _ = _aggregate({"w": u}, valid, params, jax.random.key(6))
  np.testing.assert_allclose(res.sum["w"], 0.3, atol=3 / s)
  # With noise: three participants' shares only (padding adds none).
  sigma_c = 4.0
  noisy = sa.SecAggParams.create(scale=s, share_stddev=sigma_c, bits=24)
  res, _ = _aggregate({"w": u}, valid, noisy, jax.random.key(6))
  noise = (np.asarray(res.sum["w"], np.float64) - 0.3) * s
  # Variance 3 sigma_c^2 plus rounding (< 3/4): six shares would be twice.
  assert np.var(noise) == pytest.approx(3 * sigma_c ** 2, rel=0.1)


def test_noise_shares_sum_to_the_central_noise():
  n, d, c, s, z = 10, 20_000, 1.0, 2.0 ** 12, 1.0
  sigma_c = sa.share_stddev(z, c, s, n)
  bits = sa.required_bits(n, c, s, sigma_c)
  sa.check_params(n, c, s, sigma_c, bits)
  assert bits <= 32
  u = _clipped_updates(jax.random.key(7), n, d, c)
  params = sa.SecAggParams.create(scale=s, share_stddev=sigma_c, bits=bits)
  res, failures = _aggregate({"w": u}, jnp.ones(n, bool), params,
                               jax.random.key(8))
  noise = (np.asarray(res.sum["w"], np.float64)
           - np.asarray(u, np.float64).sum(0))
  # Rounding adds variance <= n / (4 s^2) ~ 1.5e-7: negligible at this n.
  assert stats.kstest(noise / (z * c), "norm").pvalue > 1e-3
  assert abs(noise.std() / (z * c) - 1) < 5 / math.sqrt(2 * d)
  assert int(res.num_wrapped) == 0 and int(failures) == 0
  # Different keys, different noise; the same key, the same result.
  again, _ = _aggregate({"w": u}, jnp.ones(n, bool), params,
                          jax.random.key(8))
  np.testing.assert_array_equal(again.sum["w"], res.sum["w"])


def test_decode_flags_every_sum_in_the_guard_band_and_counts_wraps():
  bits = 8  # range [-128, 128); flag threshold 64
  true = np.arange(-191, 192, dtype=np.int64)  # |t| < 3 * 2^(bits-2)
  acc = jnp.asarray((true % 2 ** 32).astype(np.uint32))
  params = sa.SecAggParams.create(scale=1.0, share_stddev=0.0, bits=bits)
  res = sa.decode({"w": acc}, params)
  decoded = np.asarray(res.sum["w"]).astype(np.int64)
  np.testing.assert_array_equal(decoded % 256, true % 256)
  wrapped = (true < -128) | (true >= 128)
  assert int(res.num_wrapped) == int(wrapped.sum()) > 0
  np.testing.assert_array_equal(decoded[~wrapped], true[~wrapped])
  # Every true sum of magnitude >= 64 is flagged, wrapped or not; no other.
  assert int(res.num_near_overflow) == int(np.sum(np.abs(true) >= 64))
  # 32 bits decode the accumulator as int32 exactly.
  res32 = sa.decode({"w": acc}, sa.SecAggParams.create(
      scale=1.0, share_stddev=0.0, bits=32))
  np.testing.assert_array_equal(np.asarray(res32.sum["w"]), true)
  assert int(res32.num_wrapped) == 0


def test_too_few_bits_is_detected_and_reported():
  n, d, c, s = 20, 4, 1.0, 2.0 ** 10
  # Every client at +C / sqrt(d) in every coordinate: sum = n s C / sqrt(d).
  u = jnp.full((n, d), c / math.sqrt(d))
  true = n * s * c / math.sqrt(d)  # 10240
  bits = int(math.floor(math.log2(true))) + 1  # 14: range [-8192, 8192)
  # The true sum wrapped once, into the guard band: the server sees it.
  assert 2 ** (bits - 1) <= true < 1.5 * 2 ** (bits - 1)
  params = sa.SecAggParams.create(scale=s, share_stddev=0.0, bits=bits)
  res, _ = _aggregate({"w": u}, jnp.ones(n, bool), params, jax.random.key(9))
  assert int(res.num_wrapped) == d
  assert int(res.num_near_overflow) == d
  # And the decoded sum is indeed wrong, by a multiple of 2^bits / s.
  err = np.asarray(res.sum["w"]) - true / s
  assert np.all(np.abs(err) > 1)
  np.testing.assert_allclose(err, -(2 ** bits) / s, atol=n / s)
  # One bit fewer: the sum wraps past the guard band; only the simulator's
  # oracle can tell (this is why required_bits keeps a public margin).
  params = sa.SecAggParams.create(scale=s, share_stddev=0.0, bits=bits - 2)
  res, _ = _aggregate({"w": u}, jnp.ones(n, bool), params, jax.random.key(9))
  assert int(res.num_wrapped) == d
  # required_bits would have avoided it.
  ok = sa.SecAggParams.create(scale=s, share_stddev=0.0,
                              bits=sa.required_bits(n, c, s, 0.0))
  res_ok, _ = _aggregate({"w": u}, jnp.ones(n, bool), ok, jax.random.key(9))
  assert int(res_ok.num_wrapped) == 0 and int(res_ok.num_near_overflow) == 0


def test_check_params_refuses_int32_overflow():
  with pytest.raises(ValueError, match="overflow"):
    sa.check_params(2000, 1.0, 2.0 ** 21, 10.0, 32)
  with pytest.raises(ValueError, match="float32"):
    sa.check_params(1, 1.0, 2.0 ** 23, 10.0, 32)
  with pytest.raises(ValueError, match="bits"):
    sa.check_params(10, 1.0, 2.0, 1.0, 33)


def _rdp_eps(event, count=100, delta=1e-5):
  acc = rdp.RdpAccountant()
  acc.compose(dp_accounting.SelfComposedDpEvent(event, count))
  return acc.get_epsilon(delta)


def test_event_is_the_ddg_bound_and_close_to_central_for_large_shares():
  n, c, s, z, d = 100, 1.0, 2.0 ** 14, 1.2, 10_000
  sigma_c = sa.share_stddev(z, c, s, n)
  event = sa.dp_event(clip_norm=c, scale=s, share_stddev_=sigma_c,
                      min_shares=n, max_shares=n, dim=d)
  sens = s * c + math.sqrt(d)
  # tau underflows for sigma_c this large: rho = D^2 / (2 n sigma_c^2).
  assert event.rho == pytest.approx(sens ** 2 / (2 * n * sigma_c ** 2),
                                    rel=1e-12)
  # The same RDP curve as a Gaussian with z_eff = sqrt(n) sigma_c / D < z.
  z_eff = math.sqrt(n) * sigma_c / sens
  assert z_eff < z and z_eff == pytest.approx(z / (1 + math.sqrt(d) / (s * c)))
  assert _rdp_eps(event) == pytest.approx(
      _rdp_eps(dp_accounting.GaussianDpEvent(z_eff)), rel=1e-9)
  # The project's ledger takes it with the RDP accountant, not with PLD.
  eps = accounting.epsilon_of([event] * 100, 1e-5, accountant="rdp",
                              relation=ZERO_OUT)
  assert eps == pytest.approx(_rdp_eps(event), rel=1e-9)
  with pytest.raises(accounting.UnsupportedAccountingError):
    accounting.epsilon_of([event], 1e-5, accountant="pld",
                          relation=ZERO_OUT)


def test_event_small_shares_pay_tau_and_take_the_worst_participant_count():
  n, d = 100, 10_000
  rho_small = sa.ddg_rho(10.0, 0.5, n, d)
  assert rho_small > 0.5 * (10.0 / (math.sqrt(n) * 0.5)) ** 2 * 1.5
  with pytest.raises(ValueError, match="1/2"):
    sa.ddg_rho(10.0, 0.4, n, d)
  kw = dict(clip_norm=1.0, scale=2.0 ** 12, dim=d)
  sens = 2.0 ** 12 + math.sqrt(d)
  # Large shares: rho falls with the number of participants, so the bound
  # over [n_min, max] is the one at n_min, whatever the sampler.
  exact = sa.dp_event(share_stddev_=500.0, min_shares=n, max_shares=n, **kw)
  ranged = sa.dp_event(share_stddev_=500.0, min_shares=n, max_shares=400,
                       **kw)
  assert ranged.rho == pytest.approx(exact.rho, rel=1e-12)
  assert exact.rho == pytest.approx(sa.ddg_rho(sens, 500.0, n, d), rel=1e-12)
  # Small shares: tau grows with the number of shares, and can make more
  # participants worse; the event takes the largest rho over the range.
  per_n = [sa.ddg_rho(sens, 0.5, k, d) for k in range(n, 401)]
  small = sa.dp_event(share_stddev_=0.5, min_shares=n, max_shares=400, **kw)
  assert small.rho == pytest.approx(max(per_n), rel=1e-12)
  assert max(per_n) > per_n[0]
  # Fewer participants (colluders subtracting their shares) mean less
  # privacy: half the shares, twice rho.
  fewer = sa.dp_event(share_stddev_=500.0, min_shares=n // 2,
                      max_shares=n // 2, **kw)
  assert fewer.rho == pytest.approx(2 * exact.rho, rel=1e-12)
  with pytest.raises(ValueError, match="min_shares"):
    sa.dp_event(share_stddev_=500.0, min_shares=0, max_shares=4, **kw)


def test_encode_sends_noise_for_a_non_finite_participant_and_nothing_for_padding():
  params = sa.SecAggParams.create(scale=2.0 ** 8, share_stddev=3.0, bits=24)
  u = {"w": jnp.full((5000,), jnp.nan)}
  msg, _ = sa.encode(u, jnp.bool_(True), jnp.bool_(False), params,
                     jax.random.key(0))
  value = np.asarray(jax.lax.bitcast_convert_type(msg["w"], jnp.int32),
                     np.float64)
  # The update is replaced by 0; the share remains (discrete Gaussian, std 3).
  assert np.all(np.isfinite(value)) and np.any(value != 0)
  assert np.std(value) == pytest.approx(3.0, rel=0.1)
  pad, fails = sa.encode(u, jnp.bool_(False), jnp.bool_(False), params,
                         jax.random.key(0))
  assert not np.any(np.asarray(pad["w"])) and int(fails) == 0


def test_aggregate_compiles_once_for_all_encoding_params():
  fn = jax.jit(chex.assert_max_traces(_encode_sum_decode, n=1),
               static_argnames=("max_trials",))
  u = {"w": jnp.full((4, 8), 0.25)}
  for scale, sigma_c, bits in ((2.0 ** 8, 1.0, 16), (2.0 ** 10, 3.0, 24)):
    params = sa.SecAggParams.create(scale=scale, share_stddev=sigma_c,
                                    bits=bits)
    res, _ = fn(u, jnp.ones(4, bool), params, jax.random.key(0))
    assert int(res.num_wrapped) == 0
