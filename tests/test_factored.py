"""The factored round computes the same round as dp_fedavg.build_round."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_dp import audit
from fedjax_dp import client as client_lib
from fedjax_dp import server as server_lib
from fedjax_dp.algorithms import dp_fedavg
from fedjax_dp.algorithms import factored
from fedjax_dp.models import cnn as cnn_lib
from fedjax_dp.models import registry
from fedjax_dp.data import blocks
from fedjax_dp.privacy import adaptive_clipping
from fedjax_dp.privacy import plan as plan_lib
from fedjax_dp.privacy import tree_aggregation

INPUT_SHAPE = (6, 6, 1)
NUM_CLASSES = 5
CLIENTS, STEPS, BATCH = 11, 3, 4
# Checked to be present; every metric the reference reports is compared.
METRIC_KEYS = ("num_clients", "num_nonfinite", "train_loss",
               "fraction_clipped", "update_norm_p10", "update_norm_p50",
               "update_norm_p90", "update_norm_max", "clipped_sum_norm",
               "noise_stddev", "num_examples")


@functools.lru_cache(maxsize=None)
def _model(name):
  kwargs = {"hidden": (16, 8)} if name == "mlp_2nn" else {}
  return registry.get_model(name, INPUT_SHAPE, NUM_CLASSES, **kwargs)


@functools.lru_cache(maxsize=None)
def _rounds(name, chunk, vmap=True):
  """(reference, factored) jitted round functions for a model."""
  model = _model(name)
  client_opt = client_lib.client_optimizer("sgd")
  server_opt = server_lib.server_optimizer("sgd")
  ref = jax.jit(dp_fedavg.build_round(model, client_opt, server_opt,
                                      clients_per_chunk=1))
  fac = jax.jit(dp_fedavg.build_round(
      model, client_opt, server_opt, clients_per_chunk=chunk,
      vmap_clients=vmap, factored=True))
  return ref, fac


def _block(seed=0, padded_clients=3):
  """A block with padded examples, an all-padding step and padded slots."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(CLIENTS, STEPS, BATCH) + INPUT_SHAPE).astype(np.float32)
  y = rng.integers(0, NUM_CLASSES, (CLIENTS, STEPS, BATCH)).astype(np.int32)
  mask = rng.random((CLIENTS, STEPS, BATCH)) < 0.75
  mask[0] = True
  mask[1, 1] = False  # an all-padding step between real ones
  mask[2, 2:] = False  # a client that trains for fewer steps
  mask[3] = False  # a valid client with no examples at all
  valid = np.ones((CLIENTS,), bool)
  if padded_clients:
    valid[-padded_clients:] = False
    # Padded slots may hold anything; they must still add nothing.
    x[-padded_clients:] = 1e3
  return blocks.ClientBlock({"x": x, "y": y}, mask, valid)


def _hparams(clip, z, lr=0.5):
  return dp_fedavg.RoundHparams.create(
      client_lr=lr, server_lr=1.0, clip_norm=clip, noise_multiplier=z,
      denominator=8.0)


def _state(name, seed=0):
  return server_lib.init(_model(name).init(jax.random.key(seed)),
                         server_lib.server_optimizer("sgd"))


# The factored round clips with a certified upper bound of each client's
# norm (clipping.gram_norm_sq_upper_bound), above the exact norm by a
# relative K T^2 / (2 S): here K ~ 1.2e-5 (inner dimensions <= 37, 12 rows)
# and T^2 / S, the triangle bound over the true norm, squared, stays below
# ~10 on these random clients. So pre-clip norms may exceed the reference's
# by up to this, and clipped updates (and everything after them) be smaller
# by as much.
NORM_SLACK = 1e-3
NORM_KEYS = ("update_norm_p10", "update_norm_p50", "update_norm_p90",
             "update_norm_max")


def _assert_rounds_close(out_ref, out_fac, atol=2e-6, rtol=2e-5,
                         clipped=True):
  """`clipped`: some client may be clipped, so the certified bound's slack
  reaches the parameters."""
  (s_ref, m_ref), (s_fac, m_fac) = out_ref, out_fac
  slack = max(rtol, NORM_SLACK) if clipped else rtol
  chex.assert_trees_all_close(s_fac.params, s_ref.params, atol=atol,
                              rtol=slack)
  assert set(m_fac) == set(m_ref)
  assert set(METRIC_KEYS) <= set(m_ref)
  for k in m_ref:
    got, want = np.asarray(m_fac[k]), np.asarray(m_ref[k])
    if k in NORM_KEYS:
      # An upper bound of the exact norm, and a tight one.
      assert np.all(got >= want * (1 - rtol) - atol), k
      np.testing.assert_allclose(got, want, rtol=NORM_SLACK, atol=atol,
                                 err_msg=k)
    elif k in ("clipped_sum_norm", "signal_to_noise", "canary_cosines",
               "fraction_clipped"):
      np.testing.assert_allclose(got, want, rtol=slack, atol=atol, err_msg=k)
    else:
      np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=k)
  assert int(s_fac.round) == int(s_ref.round)


# 11 clients in chunks of 4: two scanned chunks and a tail of 3; None sizes
# the chunk automatically (here: all 11 in one). The CNN trains its
# convolutions per client (vmapped, or as independent copies) and its dense
# head in factored form.
@pytest.mark.parametrize("name,chunk,vmap", [
    ("mlp_2nn", 4, True), ("mlp_2nn", None, True), ("logistic", 4, True),
    ("cnn", 4, False), pytest.param("cnn", 4, True, marks=pytest.mark.slow)])
@pytest.mark.parametrize("clip,z", [(np.inf, 0.0), (0.3, 1.0), (1e-4, 0.0)])
def test_factored_round_equals_reference(name, clip, z, chunk, vmap):
  ref, fac = _rounds(name, chunk, vmap)
  state, block = _state(name), _block()
  key = jax.random.key(7)
  out_ref = ref(state, block, _hparams(clip, z), key)
  out_fac = fac(state, block, _hparams(clip, z), key)
  _assert_rounds_close(out_ref, out_fac, clipped=clip < np.inf)
  if clip == 1e-4:  # every client with examples is clipped
    n = int(out_ref[1]["num_clients"])
    assert float(out_fac[1]["fraction_clipped"]) == pytest.approx((n - 1) / n)


def test_no_clip_no_noise_sum_is_the_plain_fedavg_sum():
  """clip inf, z 0: the server moves by exactly the sum of deltas / denom."""
  ref, fac = _rounds("mlp_2nn", 4)
  state, block = _state("mlp_2nn"), _block()
  hp = _hparams(np.inf, 0.0)
  (s_fac, m_fac) = fac(state, block, hp, jax.random.key(0))
  (s_ref, _) = ref(state, block, hp, jax.random.key(1))  # key unused: z = 0
  chex.assert_trees_all_close(s_fac.params, s_ref.params, atol=2e-6,
                              rtol=2e-5)
  assert float(m_fac["fraction_clipped"]) == 0.0
  assert float(m_fac["noise_stddev"]) == 0.0


def test_padded_clients_change_nothing():
  _, fac = _rounds("mlp_2nn", 4)
  state = _state("mlp_2nn")
  hp = _hparams(0.3, 0.0)
  with_pad = _block(padded_clients=3)
  # Same valid clients, padded slots now filled with different junk.
  other = with_pad._replace(features={
      "x": np.where(with_pad.client_mask[:, None, None, None, None, None],
                    with_pad.features["x"], -7.0).astype(np.float32),
      "y": with_pad.features["y"]})
  a = fac(state, with_pad, hp, jax.random.key(0))
  b = fac(state, other, hp, jax.random.key(0))
  chex.assert_trees_all_close(a[0].params, b[0].params, atol=0, rtol=0)
  for k in a[1]:
    np.testing.assert_array_equal(np.asarray(a[1][k]), np.asarray(b[1][k]))


@pytest.mark.parametrize("name,vmap", [("mlp_2nn", True), ("cnn", False)])
def test_non_finite_clients_are_dropped_as_in_the_reference(name, vmap):
  """NaN data in a valid client and in a padded slot: both add nothing."""
  ref, fac = _rounds(name, 4, vmap)
  state, block = _state(name), _block()
  x = block.features["x"].copy()
  x[4, 0, 0, 0, 0, 0] = np.nan  # a valid client
  x[-1, 1, 2, 3, 3, 0] = np.inf  # a padded slot
  block = block._replace(features={"x": x, "y": block.features["y"]})
  hp = _hparams(0.3, 0.0)
  out_ref = ref(state, block, hp, jax.random.key(0))
  out_fac = fac(state, block, hp, jax.random.key(0))
  assert int(out_fac[1]["num_nonfinite"]) == 1
  for leaf in jax.tree_util.tree_leaves(out_fac[0].params):
    assert np.all(np.isfinite(np.asarray(leaf)))
  _assert_rounds_close(out_ref, out_fac)


@pytest.mark.parametrize("name,vmap", [
    ("mlp_2nn", True), pytest.param("cnn", False, marks=pytest.mark.slow)])
def test_canaries_equal_the_reference(name, vmap):
  """Audit canaries replace a slot's update by norm * direction, as there."""
  ref, fac = _rounds(name, 4, vmap)
  state, block = _state(name), _block()
  ids = np.full((CLIENTS,), -1, np.int32)
  ids[[1, 5, 6]] = [0, 1, 0]  # canary 0 twice, in two different chunks
  ids[-1] = 1  # a canary id in a padded slot adds nothing
  canaries = dp_fedavg.Canaries(
      audit.canary_directions(jax.random.key(5), 2, state.params),
      jnp.asarray(ids), jnp.float32(50.0))
  hp = _hparams(0.3, 0.5)
  out_ref = ref(state, block, hp, jax.random.key(4), canaries)
  out_fac = fac(state, block, hp, jax.random.key(4), canaries)
  assert "canary_cosines" in out_fac[1]
  _assert_rounds_close(out_ref, out_fac)


@pytest.mark.parametrize("name,vmap", [("mlp_2nn", True), ("cnn", False)])
def test_several_rounds_stay_equal(name, vmap):
  """Round after round (new blocks, new keys, the server state moving on),
  the factored round equals the plain one. Both start each round from the
  plain round's state: the factored round clips with a certified bound up
  to NORM_SLACK above the true norm, and a noisy CNN amplifies that small
  difference from round to round, which is not what this compares."""
  ref, fac = _rounds(name, 4, vmap)
  state = _state(name, seed=3)
  for r in range(3):
    block = _block(seed=r)
    hp = _hparams(0.5, 0.5, lr=0.3)
    key = jax.random.fold_in(jax.random.key(11), r)
    out_ref = ref(state, block, hp, key)
    out_fac = fac(state, block, hp, key)
    _assert_rounds_close(out_ref, out_fac, atol=5e-6, rtol=5e-5)
    state = out_ref[0]


@pytest.mark.parametrize("mechanism", ["adaptive", "tree"])
def test_mechanism_state_moves_alike_in_both_backends(mechanism):
  """The factored backend is a backend of the one round: a mechanism that
  carries state (adaptive clipping's clip norm, DP-FTRL's tree) moves it
  the same way round after round."""
  adaptive = mechanism == "adaptive"
  privatizer = plan_lib.Privatizer.create(
      mechanism="gaussian" if adaptive else "tree",
      tree_restart_every=None if adaptive else 2,
      adaptive_clipping=adaptive)
  model = _model("mlp_2nn")
  client_opt = client_lib.client_optimizer("sgd")
  server_opt = server_lib.server_optimizer("sgd")
  ref, fac = (jax.jit(dp_fedavg.build_round(
      model, client_opt, server_opt, privatizer, clients_per_chunk=chunk,
      factored=f)) for f, chunk in ((False, 1), (True, 4)))
  privacy = (plan_lib.PrivacyState(clip_norm=jnp.float32(0.3)) if adaptive
             else plan_lib.PrivacyState(correlated=tree_aggregation.init(
                 jax.random.key(5))))
  state = _state("mlp_2nn", seed=3)._replace(privacy=privacy)
  args = ((adaptive_clipping.AdaptiveClipHparams.create(
      expected_cohort_size=8.0, target_quantile=0.5, learning_rate=0.2,
      count_stddev=0.4),) if adaptive else ())
  for r in range(3):
    key = jax.random.fold_in(jax.random.key(11), r)
    hp = _hparams(0.3, 0.5, lr=0.3)
    out_ref = ref(state, _block(seed=r), hp, key, None, *args)
    out_fac = fac(state, _block(seed=r), hp, key, None, *args)
    _assert_rounds_close(out_ref, out_fac, atol=5e-6, rtol=5e-5)
    new_ref, new_fac = out_ref[0].privacy, out_fac[0].privacy
    if adaptive:
      assert float(new_ref.clip_norm) != float(state.privacy.clip_norm)
      np.testing.assert_allclose(new_fac.clip_norm, new_ref.clip_norm,
                                 rtol=1e-5)
    else:
      assert int(new_ref.correlated.step) == r % 2 + 1
      assert int(new_fac.correlated.step) == int(new_ref.correlated.step)
      assert int(new_fac.correlated.tree_index) == int(
          new_ref.correlated.tree_index)
    state = out_ref[0]


def test_compiles_once_across_rounds_and_hyperparameters():
  model = _model("mlp_2nn")
  round_fn = dp_fedavg.build_round(
      model, client_lib.client_optimizer("sgd"),
      server_lib.server_optimizer("sgd"), clients_per_chunk=4, factored=True)
  traced = jax.jit(chex.assert_max_traces(round_fn, n=1))
  state = _state("mlp_2nn")
  for r, (clip, z, lr) in enumerate([(1.0, 1.0, 0.1), (0.2, 0.0, 0.3),
                                     (np.inf, 0.0, 0.05)]):
    state, _ = traced(state, _block(seed=r), _hparams(clip, z, lr),
                      jax.random.key(r))
  jax.block_until_ready(state)


def test_supports_and_rejects():
  assert factored.supports("mlp_2nn", "sgd", 0.0)
  assert factored.supports("2nn", "sgd", None)
  assert factored.supports("logistic", "sgd", 0.0)
  assert factored.supports("cnn", "sgd", 0.0)
  assert not factored.supports("cnn_groupnorm", "sgd", 0.0)
  assert not factored.supports("cnn", "sgd", 0.9)
  assert not factored.supports("mlp_2nn", "sgd", 0.9)
  assert not factored.supports("mlp_2nn", "adam", 0.0)
  server_opt = server_lib.server_optimizer("sgd")
  with pytest.raises(ValueError, match="plain client SGD"):
    dp_fedavg.build_round(
        _model("mlp_2nn"), client_lib.client_optimizer("sgd", momentum=0.9),
        server_opt, factored=True)
  with pytest.raises(ValueError, match="plain client SGD"):
    dp_fedavg.build_round(
        _model("mlp_2nn"), client_lib.client_optimizer("adam"), server_opt,
        factored=True)
  other = registry.get_model("cnn_groupnorm", (8, 8, 1), 3)
  with pytest.raises(ValueError, match="factored rounds cover"):
    dp_fedavg.build_round(other, client_lib.client_optimizer("sgd"),
                          server_opt, clients_per_chunk=2, factored=True)
  with pytest.raises(ValueError, match="clients_per_chunk"):
    dp_fedavg.build_round(_model("cnn"), client_lib.client_optimizer("sgd"),
                          server_opt, factored=True)


def test_cnn_features_then_dense_head_is_the_model():
  """The split the factored CNN round trains equals the flax model."""
  model = _model("cnn")
  params = model.init(jax.random.key(2))
  x = jax.random.normal(jax.random.key(3), (5,) + INPUT_SHAPE)
  feats = cnn_lib.mcmahan_features(params, x)
  hidden = jax.nn.relu(feats @ params["Dense_0"]["kernel"]
                       + params["Dense_0"]["bias"])
  logits = hidden @ params["Dense_1"]["kernel"] + params["Dense_1"]["bias"]
  names = set(cnn_lib.MCMAHAN_FEATURE_LAYERS) | {"Dense_0", "Dense_1"}
  assert set(params) == names
  np.testing.assert_allclose(logits, model.apply(params, x), rtol=1e-5,
                             atol=1e-5)


def test_adaptive_clipping_through_the_factored_round_equals_plain():
  from fedjax_dp import config as config_lib  # pylint: disable=g-import-not-at-top
  from fedjax_dp import runner  # pylint: disable=g-import-not-at-top
  base = config_lib.Config(
      name="adaptive_factored", dataset="synthetic",
      dataset_kwargs={"num_clients": 60, "max_examples": 30},
      model="logistic", rounds=4, cohort_size=12, batch_size=10,
      local_epochs=1, eval_every=4, delta=1e-3, noise_multiplier=1.0,
      adaptive_clipping=True, clip_norm=0.1)
  quiet = dict(progress=False, log=lambda s: None)
  fact = runner.run(base.replace(round_shape="factored"), **quiet)
  plain = runner.run(base.replace(round_shape="plain"), **quiet)
  for a, b in zip(fact.history, plain.history):
    assert a["clip_norm"] == pytest.approx(b["clip_norm"], rel=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(fact.params),
                  jax.tree_util.tree_leaves(plain.params)):
    np.testing.assert_allclose(a, b, atol=2e-5)


def test_simulation_picks_the_factored_cnn_round_on_cpu_in_chunks_of_two_per_core():
  from fedjax_dp import config as config_lib  # pylint: disable=g-import-not-at-top
  from fedjax_dp import simulation  # pylint: disable=g-import-not-at-top
  on_cpu = jax.default_backend() == "cpu"
  cnn = config_lib.Config(model="cnn")
  assert simulation.uses_factored_round(cnn, None) == on_cpu
  assert simulation.uses_factored_round(cnn, None, num_steps=10) == on_cpu
  # Many local steps: the plain round is faster, unless forced.
  assert not simulation.uses_factored_round(cnn, None, num_steps=30)
  assert simulation.uses_factored_round(
      cnn.replace(round_shape="factored"), None, num_steps=30)
  mlp = cnn.replace(model="mlp_2nn")
  assert simulation.uses_factored_round(mlp, None, num_steps=16)
  assert not simulation.uses_factored_round(mlp, None, num_steps=30)
  assert simulation.uses_factored_round(mlp.replace(round_shape="factored"),
                                        None, num_steps=30)
  assert simulation.uses_factored_round(cnn.replace(round_shape="factored"),
                                        None)
  assert not simulation.uses_factored_round(
      cnn.replace(round_shape="plain"), None)
  assert not simulation.uses_factored_round(
      cnn.replace(client_momentum=0.9), None)
  with pytest.raises(ValueError, match="round_shape"):
    simulation.uses_factored_round(
        cnn.replace(model="cnn_groupnorm", round_shape="factored"), None)
  plain = simulation.default_execution(cnn, capacity=1000)
  fact = simulation.default_execution(cnn, capacity=1000,
                                      factored_features=True)
  if on_cpu:
    assert fact.clients_per_chunk == 2 * plain.clients_per_chunk
    assert not fact.vmap_clients
  assert simulation.default_execution(
      cnn, capacity=3, factored_features=True).clients_per_chunk <= 3
  assert simulation.default_execution(
      cnn.replace(clients_per_chunk=5), capacity=1000,
      factored_features=True).clients_per_chunk == 5
