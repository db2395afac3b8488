"""The Laplace mechanism as a configuration of the compiled round."""

import dp_accounting
import jax
import numpy as np
import pytest
from scipy import stats

from fedjax_dp import client as client_lib
from fedjax_dp import config as config_lib
from fedjax_dp import runner
from fedjax_dp import server as server_lib
from fedjax_dp.algorithms import dp_fedavg
from fedjax_dp.models import registry
from fedjax_dp.privacy import plan as plan_lib
from helpers import tiny_blocks


def _round(model, block, hp, key=1):
  opt = server_lib.server_optimizer("sgd")
  params = model.init(jax.random.key(0))
  fn = jax.jit(dp_fedavg.build_round(
      model, client_lib.client_optimizer("sgd"), opt,
      plan_lib.Privatizer.create(mechanism="laplace")))
  state, metrics = fn(server_lib.init(params, opt), block, hp,
                      jax.random.key(key))
  return params, state, metrics



def _block(clients=3, seed=0, valid=None):
  return tiny_blocks.cohort_block(clients, seed, valid)


def test_laplace_noise_on_the_average_has_scale_z_c_over_denominator():
  model = registry.get_model("mlp_2nn", (5,), 3, hidden=(200,))
  hp = dp_fedavg.RoundHparams.create(client_lr=1e-30, server_lr=1.0,
                                     clip_norm=2.0, noise_multiplier=1.5,
                                     denominator=40.0)
  params, state, metrics = _round(model, _block(), hp)
  diff = np.concatenate([
      np.ravel(a - b) for a, b in zip(jax.tree_util.tree_leaves(state.params),
                                      jax.tree_util.tree_leaves(params))])
  scale = 1.5 * 2.0 / 40.0
  assert diff.size > 1500
  assert stats.kstest(diff / scale, "laplace").pvalue > 1e-3
  # ...and not a Gaussian of the same std (the test has power).
  assert stats.kstest(diff / (np.sqrt(2) * scale), "norm").pvalue < 1e-3
  assert float(metrics["noise_stddev"]) == pytest.approx(np.sqrt(2) * 1.5 * 2)


def test_l1_clipped_contributions_equal_an_l1_reference():
  model = registry.get_model("logistic", (5,), 3)
  block = _block()
  clip = 0.05
  hp = dp_fedavg.RoundHparams.create(client_lr=0.3, server_lr=1.0,
                                     clip_norm=clip, noise_multiplier=0.0,
                                     denominator=3.0)
  params, state, metrics = _round(model, block, hp)
  total = jax.tree_util.tree_map(np.zeros_like, params)
  for c in range(3):
    p = params
    for s in range(2):
      f = {k: v[c, s] for k, v in block.features.items()}
      g = jax.grad(lambda q: client_lib.masked_mean_loss(
          model, q, f, block.example_mask[c, s]))(p)
      p = jax.tree_util.tree_map(lambda a, b: a - 0.3 * b, p, g)
    delta = jax.tree_util.tree_map(lambda a, b: np.asarray(a - b), p, params)
    l1 = sum(np.abs(x).sum() for x in jax.tree_util.tree_leaves(delta))
    scale = min(1.0, clip / l1)
    assert l1 * scale <= clip * (1 + 1e-6)
    total = jax.tree_util.tree_map(lambda t, d: t + scale * d, total, delta)
  for a, p, t in zip(jax.tree_util.tree_leaves(state.params),
                     jax.tree_util.tree_leaves(params),
                     jax.tree_util.tree_leaves(total)):
    np.testing.assert_allclose(a, p + t / 3.0, atol=1e-6)
  assert float(metrics["fraction_clipped"]) == 1.0


def test_laplace_run_records_poisson_laplace_events_exactly():
  config = config_lib.Config(
      name="laplace", dataset="synthetic",
      dataset_kwargs={"num_clients": 60, "max_examples": 30},
      model="logistic", rounds=3, cohort_size=12, batch_size=10,
      local_epochs=1, eval_every=3, delta=1e-3, noise_multiplier=2.0,
      mechanism="laplace")
  result = runner.run(config, progress=False, log=lambda s: None)
  q = 12 / 48
  event = dp_accounting.PoissonSampledDpEvent(
      q, dp_accounting.LaplaceDpEvent(2.0))
  assert result.ledger.events == [event] * 3
  direct = dp_accounting.pld.PLDAccountant()
  direct.compose(event, 3)
  assert result.summary["epsilon"] == pytest.approx(
      direct.get_epsilon(1e-3), rel=1e-9)


def test_laplace_with_l2_only_options_is_refused():
  with pytest.raises(ValueError, match="'mechanism'"):
    config_lib.Config(mechanism="laplace", adaptive_clipping=True)
  with pytest.raises(ValueError, match="'mechanism'"):
    config_lib.Config(mechanism="laplace", per_layer_clipping="uniform")
  with pytest.raises(ValueError, match="'mechanism'"):
    config_lib.Config(mechanism="exponential")
