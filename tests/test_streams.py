"""A run's random streams: what makes two runs share (or not) their noise."""

import jax
import numpy as np
import pytest

from fedjax_dp import config as config_lib
from fedjax_dp import runner
from fedjax_dp import simulation

_QUIET = {"progress": False, "log": lambda s: None}


def _key_data(key):
  return np.asarray(jax.random.key_data(key)).tolist()


def _streams(config, z=1.0):
  s = simulation.stream_keys(config, z)
  return (_key_data(s.sample), _key_data(s.noise), _key_data(s.data),
          s.host_words)


def test_runs_that_compute_differently_get_independent_streams():
  base = config_lib.Config()
  same = _streams(base)
  for changes in ({"clip_norm": 2.0}, {"client_lr": 0.3},
                  {"server_lr": 0.5}, {"seed": 1}, {"dataset_kwargs": {
                      "num_clients": 400}}, {"model": "logistic"},
                  {"dropout_rate": 0.1},
                  {"noise_placement": "local"}, {"batch_size": 7}):
    other = _streams(base.replace(**changes))
    for a, b in zip(same, other):
      assert a != b, changes
  # The resolved noise multiplier too (a calibrated one included).
  assert _streams(base, 1.0)[1] != _streams(base, 1.1)[1]
  # Fields omitted from the identity at their defaults still count when set.
  mf = base.replace(mechanism="band_mf", sampling="cyclic", min_separation=5,
                    cohort_size=20)
  for changes in ({"mf_bands": 3}, {"min_separation": 4},
                  {"mechanism": "blt", "blt_buffers": 2},
                  # BandMF's strategy is optimised for the run's length.
                  {"rounds": 10}):
    assert _streams(mf.replace(**changes))[1] != _streams(mf)[1], changes


def test_runs_that_compute_the_same_share_their_streams():
  base = config_lib.Config()
  for changes in ({"name": "other"}, {"eval_every": 3},
                  {"checkpoint_every": 7}, {"rounds": 10},
                  {"epsilon_budget": 50.0, "stop_at_budget": True},
                  {"delta": 1e-6}, {"round_shape": "plain"},
                  {"clients_per_chunk": 3}, {"vmap_clients": True},
                  {"rounds_per_call": 2}):
    assert _streams(base.replace(**changes)) == _streams(base), changes


@pytest.mark.slow
def test_separate_runs_of_one_seed_draw_independent_noise():
  base = config_lib.Config(
      dataset="synthetic", dataset_kwargs={"num_clients": 30,
                                           "max_examples": 10},
      model="mlp_2nn", model_kwargs={"hidden": [64]}, rounds=1,
      cohort_size=5, client_lr=1e-30, eval_every=1, server_optimizer="sgd")
  init = runner.run(base.replace(noise_multiplier=0.0), **_QUIET).params

  def change(config):
    params = runner.run(config, **_QUIET).params
    return np.concatenate([np.ravel(np.asarray(a) - np.asarray(b))
                           for a, b in zip(jax.tree_util.tree_leaves(params),
                                           jax.tree_util.tree_leaves(init))])

  a, b = change(base), change(base.replace(clip_norm=2.0))
  assert abs(np.corrcoef(a, b)[0, 1]) < 6 / np.sqrt(a.size)
  # The same configuration twice releases the same model.
  np.testing.assert_array_equal(change(base), a)
