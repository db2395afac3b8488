"""Record-level DP (DP-SGD inside each client) as a round configuration."""

import math

import dp_accounting
from dp_accounting import pld
import jax
import numpy as np
import pytest

from fedjax_dp import client as client_lib
from fedjax_dp import config as config_lib
from fedjax_dp import runner
from fedjax_dp import server as server_lib
from fedjax_dp.algorithms import dp_fedavg
from fedjax_dp.models import registry
from fedjax_dp.privacy import plan as plan_lib
from helpers import tiny_blocks

_MODEL = registry.get_model("logistic", (5,), 3)



def _block(clients=4, seed=0, valid=None):
  return tiny_blocks.cohort_block(clients, seed, valid)


def _round(example_dp, hp, key=1):
  opt = server_lib.server_optimizer("sgd")
  params = _MODEL.init(jax.random.key(0))
  fn = jax.jit(dp_fedavg.build_round(
      _MODEL, client_lib.client_optimizer("sgd"), opt,
      plan_lib.Privatizer.create(example_dp=example_dp), clients_per_chunk=2))
  state, _ = fn(server_lib.init(params, opt), _block(), hp,
                jax.random.key(key))
  return np.concatenate([np.ravel(x) for x in
                         jax.tree_util.tree_leaves(state.params)]), params


def test_without_example_noise_and_clip_it_is_plain_local_sgd():
  hp = dp_fedavg.RoundHparams.create(
      client_lr=0.3, server_lr=1.0, clip_norm=math.inf, noise_multiplier=0.0,
      denominator=4.0, example_clip_norm=math.inf,
      example_noise_multiplier=0.0)
  private, _ = _round(True, hp)
  plain, _ = _round(False, hp)
  np.testing.assert_allclose(private, plain, atol=1e-6)


def test_example_noise_reaches_the_update_and_depends_on_the_key():
  hp = dp_fedavg.RoundHparams.create(
      client_lr=0.3, server_lr=1.0, clip_norm=math.inf, noise_multiplier=0.0,
      denominator=4.0, example_clip_norm=0.1, example_noise_multiplier=2.0)
  a, params = _round(True, hp, key=1)
  b, _ = _round(True, hp, key=2)
  a_again, _ = _round(True, hp, key=1)
  np.testing.assert_array_equal(a, a_again)
  # Per client and step: noise std z C / B = 0.05 on the gradient, times lr,
  # over 2 steps and 4 clients averaged by 4: std 0.3 * 0.05 * sqrt(2) / 2.
  std = 0.3 * 0.05 * math.sqrt(2) / 2
  diff = (a - b) / math.sqrt(2)
  assert 0.7 * std < np.std(diff) < 1.3 * std


def test_run_keeps_an_example_level_ledger_beside_the_client_level_one():
  config = config_lib.Config(
      dataset="breast_cancer", model="logistic", rounds=3, cohort_size=3,
      sampling="fixed", accountant="rdp", eval_every=3, local_epochs=2,
      batch_size=8, max_examples_per_client=40, noise_multiplier=0.0,
      clip_norm=math.inf, example_clip_norm=1.0, example_noise_multiplier=1.5)
  result = runner.run(config, progress=False, log=lambda s: None)
  acc = pld.PLDAccountant(dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
  acc.compose(dp_accounting.GaussianDpEvent(1.5), 3 * 2)
  want = acc.get_epsilon(config.delta)
  got = result.summary["example_epsilon"]
  # The run's ledger uses RDP; PLD is tighter, and both bound the same.
  assert want <= got <= 1.5 * want
  # Evaluation rounds and the last report it, as the summary does.
  assert ["example_epsilon" in h for h in result.history] == [
      False, False, True]
  assert result.history[-1]["example_epsilon"] == got
  assert math.isinf(result.summary["epsilon"])  # no client-level noise


def test_example_dp_config_is_validated():
  with pytest.raises(ValueError, match="'example_clip_norm'"):
    config_lib.Config(example_noise_multiplier=1.0)
  with pytest.raises(ValueError, match="'example_clip_norm'"):
    config_lib.Config(example_clip_norm=-1.0)
  with pytest.raises(ValueError, match="'example_noise_multiplier'"):
    config_lib.Config(example_clip_norm=1.0, example_noise_multiplier=-0.5)
