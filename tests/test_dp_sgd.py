"""DP-SGD inside a client: clipping, padding, noise, sensitivity, accounting."""

import chex
import dp_accounting
from dp_accounting import pld
from dp_accounting import rdp
from hypothesis import example
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from fedjax_dp import client as client_lib
from fedjax_dp import tree_util
from fedjax_dp.models import registry
from fedjax_dp.privacy import accounting
from fedjax_dp.privacy import clipping
from fedjax_dp.privacy import events
from fedjax_dp.privacy import plan as plan_lib

NUM_CLASSES = 3
INPUT = (4,)
BATCH = 4


def _model():
  return registry.get_model("logistic", INPUT, NUM_CLASSES)


def _params(model):
  # Non-zero weights, so that the loss and its gradients depend on the input.
  params = model.init(jax.random.key(0))
  return jax.tree_util.tree_map(lambda x: x + 0.1, params)


def _client_data(steps=3, batch=BATCH, seed=0, scale=1.0):
  rng = np.random.default_rng(seed)
  x = (scale * rng.normal(size=(steps, batch) + INPUT)).astype(np.float32)
  y = rng.integers(0, NUM_CLASSES, (steps, batch)).astype(np.int32)
  return {"x": jnp.asarray(x), "y": jnp.asarray(y)}


def _flat(tree):
  return np.concatenate(
      [np.ravel(np.asarray(x)) for x in jax.tree_util.tree_leaves(tree)])


_noisy_batch_gradient = jax.jit(plan_lib.noisy_batch_gradient,
                                static_argnums=(4,))

# ---------------------------------------------------------------------------
# noisy_batch_gradient


_floats = st.floats(-1e4, 1e4, allow_nan=False, width=32)


@settings(max_examples=50, deadline=None)
@given(
    a=hnp.arrays(np.float32, (BATCH, 3), elements=_floats),
    b=hnp.arrays(np.float32, (BATCH, 2, 2), elements=_floats),
    clip=st.floats(1e-3, 1e3),
)
# A subnormal gradient, which XLA:CPU flushes to zero.
@example(a=np.full((BATCH, 3), 1e-45, np.float32),
         b=np.zeros((BATCH, 2, 2), np.float32), clip=1.0)
def test_every_clipped_example_gradient_has_norm_at_most_clip(a, b, clip):
  grads = {"a": jnp.asarray(a), "b": {"c": jnp.asarray(b)}}
  # With only slot i real and no noise, B * gradient is example i's clipped
  # gradient on its own.
  one_hot = jnp.eye(BATCH, dtype=bool)
  out = jax.vmap(_noisy_batch_gradient, in_axes=(None, 0, None, None, None,
                                                 None))(
      grads, one_hot, clip, 0.0, BATCH, jax.random.key(0))
  for i in range(BATCH):
    clipped = jax.tree_util.tree_map(lambda g: BATCH * g[i], out.gradient)
    norm = float(tree_util.global_l2_norm(clipped))
    assert norm <= clip * (1 + 1e-5)
    original = np.sqrt(np.sum(a[i].astype(np.float64) ** 2)
                       + np.sum(b[i].astype(np.float64) ** 2))
    assert float(out.norms[i, i]) == pytest.approx(original, rel=1e-5,
                                                   abs=1e-6)
    assert bool(out.was_clipped[i, i]) == (float(out.norms[i, i])
                                           > float(np.float32(clip)))
    # Diagnostics of padding slots are 0 / False.
    others = np.arange(BATCH) != i
    assert np.all(np.asarray(out.norms[i])[others] == 0.0)
    assert not np.any(np.asarray(out.was_clipped[i])[others])


def test_padding_examples_change_nothing_even_nan():
  rng = np.random.default_rng(0)
  g = rng.normal(size=(6, 5)).astype(np.float32) * 3.0
  mask = np.array([True, False, True, True, False, True])
  poisoned = g.copy()
  poisoned[1] = np.nan
  poisoned[4] = np.inf
  cleaned = np.where(mask[:, None], g, 0.0).astype(np.float32)
  key = jax.random.key(3)
  args = (jnp.asarray(mask), 1.0, 0.8, 6, key)
  out_poisoned = _noisy_batch_gradient({"w": jnp.asarray(poisoned)}, *args)
  out_cleaned = _noisy_batch_gradient({"w": jnp.asarray(cleaned)}, *args)
  np.testing.assert_array_equal(out_poisoned.gradient["w"],
                                out_cleaned.gradient["w"])
  assert np.all(np.isfinite(out_poisoned.gradient["w"]))
  np.testing.assert_array_equal(out_poisoned.norms, out_cleaned.norms)


def test_infinite_clip_and_zero_noise_give_exactly_masked_sum_over_b():
  rng = np.random.default_rng(1)
  # Integer-valued gradients and a power-of-two batch: the sum and the
  # division are exact in float32 whatever order XLA sums in, so "exactly"
  # can be tested bit for bit.
  g = rng.integers(-1000, 1000, size=(4, 7)).astype(np.float32)
  mask = np.array([True, True, False, True])
  g[2] = np.nan
  out = _noisy_batch_gradient({"w": jnp.asarray(g)}, jnp.asarray(mask),
                              jnp.inf, 0.0, 4, jax.random.key(0))
  expected = np.sum(g[mask], axis=0) / 4
  np.testing.assert_array_equal(out.gradient["w"], expected)
  assert not np.any(out.was_clipped)


def test_noise_is_gaussian_with_stddev_z_c_over_batch_size():
  batch, clip, z = 8, 1.5, 1.3
  n = 120_000
  grads = {"a": jnp.zeros((batch, n // 2)), "b": jnp.zeros((batch, n // 4, 2))}
  # Only 3 real examples: the divisor must still be the public batch size.
  mask = jnp.arange(batch) < 3
  out = _noisy_batch_gradient(grads, mask, clip, z, batch, jax.random.key(5))
  sigma = z * clip / batch
  x = _flat(out.gradient).astype(np.float64) / sigma
  assert x.size == n
  # KS test against N(0, 1): p > 1e-3 fails by accident 1 time in 1000.
  assert stats.kstest(x, "norm").pvalue > 1e-3
  # Chi-square on the variance: sum x^2 ~ chi2(n) if the stddev is right.
  # Two-sided level 1e-4; a stddev off by 1% would move the statistic by
  # ~2% of n = 2400, i.e. ~5 standard deviations (sqrt(2n) ~ 490).
  q = stats.chi2.cdf(np.sum(x ** 2), df=n)
  assert 5e-5 < q < 1 - 5e-5
  assert abs(x.mean()) < 5 / np.sqrt(n)


def test_zeroing_out_one_slot_moves_the_pre_noise_sum_by_at_most_c():
  rng = np.random.default_rng(2)
  batch, clip = 6, 1.0
  # Mixed scales: some examples are clipped, some are not.
  scales = np.array([0.01, 0.1, 5.0, 50.0, 0.2, 3.0], np.float32)
  g = {"a": jnp.asarray(rng.normal(size=(batch, 4)) * scales[:, None]
                        ).astype(jnp.float32),
       "b": jnp.asarray(rng.normal(size=(batch, 2, 3)) * scales[:, None, None]
                        ).astype(jnp.float32)}
  full = jnp.ones((batch,), bool)

  def pre_noise_sum(mask):
    out = _noisy_batch_gradient(g, mask, clip, 0.0, batch, jax.random.key(0))
    return _flat(out.gradient).astype(np.float64) * batch, out

  s_full, out_full = pre_noise_sum(full)
  clipped_any = False
  for i in range(batch):
    s_zeroed, _ = pre_noise_sum(full.at[i].set(False))
    change = np.linalg.norm(s_full - s_zeroed)
    assert change <= clip * (1 + 1e-5)
    # The bound is attained by clipped examples, and an unclipped one moves
    # the sum by its own norm: the sum is of per-example clipped gradients.
    norm_i = float(out_full.norms[i])
    assert change == pytest.approx(min(norm_i, clip), rel=1e-4)
    clipped_any |= bool(out_full.was_clipped[i])
  assert clipped_any


def test_same_key_same_noise_different_key_different_noise():
  g = {"w": jnp.zeros((BATCH, 2000))}
  mask = jnp.ones((BATCH,), bool)
  a = _noisy_batch_gradient(g, mask, 1.0, 1.0, BATCH, jax.random.key(1))
  b = _noisy_batch_gradient(g, mask, 1.0, 1.0, BATCH, jax.random.key(1))
  c = _noisy_batch_gradient(g, mask, 1.0, 1.0, BATCH, jax.random.key(2))
  np.testing.assert_array_equal(a.gradient["w"], b.gradient["w"])
  # Independent N(0, s^2) vectors: correlation ~ N(0, 1/2000).
  assert abs(np.corrcoef(a.gradient["w"], c.gradient["w"])[0, 1]) < 5 / np.sqrt(
      2000)


# ---------------------------------------------------------------------------
# make_dp_sgd_client_update
#
# All client tests share one model and one block shape [STEPS, BATCH], and
# pass hyperparameters as Python floats, so that each jitted function below
# compiles once for the whole file.

STEPS = 3
CLIENTS = 128
_MODEL = _model()
_dp_sgd_update = jax.jit(client_lib.make_dp_sgd_client_update(
    _MODEL, client_lib.client_optimizer("sgd"), plan_lib.noisy_batch_gradient))
_plain_sgd_update = jax.jit(client_lib.make_client_update(
    _MODEL, client_lib.client_optimizer("sgd")))
# Shared params, per-client features, mask and key; one trace allowed.
_dp_sgd_cohort = jax.jit(jax.vmap(
    chex.assert_max_traces(client_lib.make_dp_sgd_client_update(
        _MODEL, client_lib.client_optimizer("sgd"),
        plan_lib.noisy_batch_gradient), n=1),
    in_axes=(None, 0, 0, None, None, None, 0)))


def _assert_trees_equal(a, b):
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b),
                  strict=True):
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("trailing_padding", [0, 1])
def test_no_clip_no_noise_equals_plain_local_sgd(trailing_padding):
  params = _params(_MODEL)
  features = _client_data(steps=STEPS)
  mask = np.ones((STEPS, BATCH), bool)
  if trailing_padding:
    mask[STEPS - trailing_padding:] = False
    # Padding holds garbage: it must not matter on either side.
    features["x"] = features["x"].at[STEPS - trailing_padding:].set(jnp.nan)
  mask = jnp.asarray(mask)
  dp = _dp_sgd_update(params, features, mask, 0.3, float("inf"), 0.0,
                      jax.random.key(0))
  plain = _plain_sgd_update(params, features, mask, 0.3)
  for a, b in zip(jax.tree_util.tree_leaves(dp.delta),
                  jax.tree_util.tree_leaves(plain.delta), strict=True):
    # Sum/B and the batch mean differ only by float32 rounding.
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert float(dp.loss) == pytest.approx(float(plain.loss), rel=1e-6)
  assert int(dp.num_examples) == int(plain.num_examples)
  assert float(tree_util.global_l2_norm(dp.delta)) > 1e-3  # it trained


def test_padding_examples_change_nothing_in_client_update():
  params = _params(_MODEL)
  features = _client_data(steps=STEPS, scale=5.0)
  mask = jnp.asarray(np.random.default_rng(4).random((STEPS, BATCH)) < 0.6)
  poisoned = dict(features)
  poisoned["x"] = jnp.where(mask[..., None], features["x"], jnp.nan)
  args = (mask, 0.1, 1.0, 0.7, jax.random.key(9))
  clean = _dp_sgd_update(params, features, *args)
  out = _dp_sgd_update(params, poisoned, *args)
  _assert_trees_equal(clean, out)
  assert bool(tree_util.tree_all_finite(out.delta))
  assert np.isfinite(float(out.loss))


def test_client_update_zero_out_sensitivity_is_per_example_clipped():
  """Zeroing out slot i moves the delta by lr * min(|g_i|, C) / B, <= lr C/B.

  Only the first step holds examples and there is no noise, so later steps
  (zero gradient under SGD) move nothing and the delta is one step's.
  """
  params = _params(_MODEL)
  clip, lr = 1.0, 0.5
  features = _client_data(steps=STEPS, scale=4.0, seed=7)
  real = jnp.zeros((STEPS, BATCH), bool).at[0].set(True)

  def delta(mask):
    out = _dp_sgd_update(params, features, mask, lr, clip, 0.0,
                         jax.random.key(0))
    return _flat(out.delta).astype(np.float64)

  def example_grad_norm(i):
    f = {k: v[0, i:i + 1] for k, v in features.items()}
    g = jax.grad(lambda p: client_lib.masked_mean_loss(
        _MODEL, p, f, jnp.ones((1,), bool)))(params)
    return float(tree_util.global_l2_norm(g))

  d_full = delta(real)
  norms = [example_grad_norm(i) for i in range(BATCH)]
  assert max(norms) > clip > min(norms)  # both regimes are exercised
  for i in range(BATCH):
    change = np.linalg.norm(d_full - delta(real.at[0, i].set(False)))
    assert change <= lr * clip / BATCH * (1 + 1e-5)
    assert change == pytest.approx(lr * min(norms[i], clip) / BATCH, rel=1e-4)


def test_client_update_same_key_same_result_different_key_different_noise():
  params = _params(_MODEL)
  features = _client_data(steps=STEPS)
  mask = jnp.ones((STEPS, BATCH), bool)
  lr, clip, z = 0.2, 1.0, 1.0
  args = (params, features, mask, lr, clip, z)
  a = _dp_sgd_update(*args, jax.random.key(1))
  b = _dp_sgd_update(*args, jax.random.key(1))
  c = _dp_sgd_update(*args, jax.random.key(2))
  _assert_trees_equal(a, b)
  # Two independent runs differ by their noise: per coordinate about
  # lr * z * C / B * sqrt(2 * STEPS) (the clipped gradients, bounded by
  # lr * C / B per step, differ much less). A lower bound at 30% of that
  # fails only if the noise were (nearly) the same.
  diff = _flat(a.delta) - _flat(c.delta)
  expected = lr * z * clip / BATCH * np.sqrt(2 * STEPS * diff.size)
  assert np.linalg.norm(diff) > 0.3 * expected


def _cohort_data(seed):
  feats = [_client_data(steps=STEPS, seed=seed + c) for c in range(CLIENTS)]
  return jax.tree_util.tree_map(lambda *x: jnp.stack(x), *feats)


def test_every_step_is_noised_all_padding_steps_included():
  """All-padding clients still take STEPS independent noisy steps."""
  params = _params(_MODEL)
  clip, z, lr = 2.0, 1.5, 1.0
  mask = jnp.zeros((CLIENTS, STEPS, BATCH), bool)
  keys = jax.random.split(jax.random.key(11), CLIENTS)
  out = _dp_sgd_cohort(params, _cohort_data(0), mask, lr, clip, z, keys)
  # delta = -lr * sum over steps of N(0, (zC/B)^2): variance STEPS * s^2. A
  # skipped padding step (variance 0), or one noise draw reused across steps
  # (variance STEPS^2 * s^2), fails this.
  sigma = lr * z * clip / BATCH * np.sqrt(STEPS)
  x = _flat(out.delta).astype(np.float64) / sigma
  n = x.size
  assert stats.kstest(x, "norm").pvalue > 1e-3
  # Chi-square on the variance at two-sided level 1e-4.
  q = stats.chi2.cdf(np.sum(x ** 2), df=n)
  assert 5e-5 < q < 1 - 5e-5
  np.testing.assert_array_equal(out.loss, 0.0)
  np.testing.assert_array_equal(out.num_examples, 0)


def test_vmaps_over_clients_with_shared_params_and_compiles_once():
  params = _params(_MODEL)
  features = _cohort_data(100)
  mask = jnp.asarray(
      np.random.default_rng(3).random((CLIENTS, STEPS, BATCH)) < 0.7)
  keys = jax.random.split(jax.random.key(4), CLIENTS)
  hparams = ((0.1, 1.0, 0.5), (0.3, float("inf"), 0.0))
  # Different hyperparameter values: no retrace (assert_max_traces(n=1)).
  outs = [_dp_sgd_cohort(params, features, mask, *hp, keys) for hp in hparams]
  for out, hp in zip(outs, hparams):
    for c in range(3):
      ref = _dp_sgd_update(
          params, jax.tree_util.tree_map(lambda x: x[c], features), mask[c],
          *hp, keys[c])
      for x, y in zip(jax.tree_util.tree_leaves(ref),
                      jax.tree_util.tree_leaves(out), strict=True):
        np.testing.assert_allclose(x, y[c], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------
# example_dp_event


def test_example_event_over_rounds_matches_dp_accounting():
  z, epochs, rounds, delta = 1.1, 2, 5, 1e-5
  event = events.example_level(z, epochs)
  assert event == dp_accounting.SelfComposedDpEvent(
      dp_accounting.GaussianDpEvent(z), epochs)
  rel = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
  # A coarser PLD grid than the default keeps this fast; both sides use it.
  accountants = (
      (lambda: rdp.RdpAccountant(neighboring_relation=rel), 1e-9),
      (lambda: pld.PLDAccountant(neighboring_relation=rel,
                                 value_discretization_interval=1e-3), 1e-3))
  for make, tol in accountants:
    ours = make()
    for _ in range(rounds):  # one event per round, composed adaptively
      ours.compose(event)
    direct = make()
    direct.compose(dp_accounting.GaussianDpEvent(z), rounds * epochs)
    assert ours.get_epsilon(delta) == pytest.approx(
        direct.get_epsilon(delta), rel=tol)
    # R * E Gaussians of multiplier z are one Gaussian of z / sqrt(R * E):
    # an independent check of the count (an off-by-one in E or R fails).
    single = make()
    single.compose(dp_accounting.GaussianDpEvent(z / np.sqrt(rounds * epochs)))
    assert ours.get_epsilon(delta) == pytest.approx(
        single.get_epsilon(delta), rel=5e-3)
  # The project's ledger path, with the add/remove relation, agrees.
  relation = clipping.NeighbouringRelation.ADD_OR_REMOVE_ONE
  for name, tol in (("rdp", 1e-9), ("pld", 1e-3)):
    ledger_eps = accounting.epsilon_of([event] * rounds, delta,
                                       accountant=name, relation=relation)
    direct = accounting.make_accountant(name, relation)
    direct.compose(dp_accounting.GaussianDpEvent(z), rounds * epochs)
    assert ledger_eps == pytest.approx(direct.get_epsilon(delta), rel=tol)


def test_zero_out_is_accounted_as_add_remove_not_replace_one():
  """dp_accounting's replace-special (zero-out) equals add/remove here; its
  PLD under REPLACE_ONE would double the sensitivity (a different claim)."""
  event = events.example_level(1.0, 2)
  relations = dp_accounting.NeighboringRelation
  eps = {}
  for rel in (relations.ADD_OR_REMOVE_ONE, relations.REPLACE_SPECIAL,
              relations.REPLACE_ONE):
    acc = pld.PLDAccountant(neighboring_relation=rel,
                            value_discretization_interval=1e-3)
    eps[rel] = acc.compose(event).get_epsilon(1e-5)
  assert eps[relations.REPLACE_SPECIAL] == pytest.approx(
      eps[relations.ADD_OR_REMOVE_ONE], rel=1e-6)
  assert eps[relations.REPLACE_ONE] > 1.5 * eps[relations.ADD_OR_REMOVE_ONE]


def test_example_event_without_noise_is_non_private_and_validates():
  assert events.example_level(0.0, 3) == dp_accounting.NonPrivateDpEvent()
  assert accounting.epsilon_of(
      [events.example_level(0.0, 3)], 1e-5, accountant="rdp",
      relation=clipping.NeighbouringRelation.ADD_OR_REMOVE_ONE) == np.inf
  for bad in ((-1.0, 1), (float("inf"), 1), (float("nan"), 1), (1.0, 0),
              (1.0, 1.5), (1.0, True)):
    with pytest.raises(ValueError):
      events.example_level(*bad)
