"""The compiled round against a plain per-client reference loop."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

from fedjax_dp import client as client_lib
from fedjax_dp import server as server_lib
from fedjax_dp import streams
from fedjax_dp.algorithms import dp_fedavg
from fedjax_dp.models import registry
from fedjax_dp.privacy import noise
from fedjax_dp.privacy import plan as plan_lib
from fedjax_dp.data import blocks

NUM_CLASSES = 3
INPUT = (5,)


def _model(name="mlp_2nn"):
  kwargs = {"hidden": (7,)} if name == "mlp_2nn" else {}
  return registry.get_model(name, INPUT, NUM_CLASSES, **kwargs)


def _block(num_clients=4, steps=3, batch=4, seed=0, valid=None, full=False):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(num_clients, steps, batch) + INPUT).astype(np.float32)
  y = rng.integers(0, NUM_CLASSES, (num_clients, steps, batch)).astype(np.int32)
  mask = np.ones((num_clients, steps, batch), bool) if full else (
      rng.random((num_clients, steps, batch)) < 0.7)
  if not full:
    mask[:, -1] = False  # a trailing all-padding step for every client
  if valid is None:
    valid = np.ones((num_clients,), bool)
  return blocks.ClientBlock({"x": x, "y": y}, mask, np.asarray(valid))


def _hparams(client_lr=0.3, server_lr=1.0, clip=1.0, z=0.0, denom=4.0):
  return dp_fedavg.RoundHparams.create(
      client_lr=client_lr, server_lr=server_lr, clip_norm=clip,
      noise_multiplier=z, denominator=denom)


def _reference_round(model, params, block, hp, noise_key):
  """DP-FedAvg written the plain way: a Python loop over clients and steps."""
  total = jax.tree_util.tree_map(np.zeros_like, params)
  for c in range(block.client_mask.shape[0]):
    if not block.client_mask[c]:
      continue
    p = params
    for s in range(block.example_mask.shape[1]):
      m = block.example_mask[c, s]
      if not m.any():
        continue
      f = {k: v[c, s] for k, v in block.features.items()}
      g = jax.grad(lambda q: client_lib.masked_mean_loss(model, q, f, m))(p)
      p = jax.tree_util.tree_map(lambda a, b: a - float(hp.client_lr) * b, p, g)
    delta = jax.tree_util.tree_map(lambda a, b: np.asarray(a - b), p, params)
    norm = np.sqrt(sum(np.sum(np.square(d, dtype=np.float64))
                       for d in jax.tree_util.tree_leaves(delta)))
    scale = min(1.0, float(hp.clip_norm) / norm) if norm > 0 else 1.0
    total = jax.tree_util.tree_map(lambda t, d: t + scale * d, total, delta)
  sigma = noise.noise_stddev(hp.noise_multiplier, hp.clip_norm)
  # The server's noise comes from the round key's central sub-stream.
  noisy = noise.add_gaussian_noise(
      total, sigma, jax.random.fold_in(noise_key, streams.CENTRAL_NOISE))
  return jax.tree_util.tree_map(
      lambda w, u: w + float(hp.server_lr) * u / float(hp.denominator),
      params, noisy)


def _run_round(model, block, hp, chunk=1, unroll=1, key=1, params=None,
               vmap=True):
  opt = server_lib.server_optimizer("sgd")
  params = model.init(jax.random.key(0)) if params is None else params
  state = server_lib.init(params, opt)
  fn = jax.jit(dp_fedavg.build_round(
      model, client_lib.client_optimizer("sgd"), opt,
      clients_per_chunk=chunk, unroll_local_steps=unroll,
      vmap_clients=vmap))
  new_state, metrics = fn(state, block, hp, jax.random.key(key))
  return params, new_state, metrics


def _assert_trees_close(a, b, atol=2e-5):
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol,
                               rtol=1e-4)


@pytest.mark.parametrize("chunk,unroll,vmap", [
    (1, 1, True), (2, True, True), (4, 1, True), (2, True, False),
    (4, 1, False)])
@pytest.mark.parametrize("clip,z", [(0.05, 0.0), (1e6, 0.0), (0.5, 1.0)])
def test_round_equals_reference_loop(chunk, unroll, vmap, clip, z):
  model = _model()
  block = _block(valid=np.array([True, True, True, False]))
  hp = _hparams(clip=clip, z=z, denom=3.5)
  params, state, metrics = _run_round(model, block, hp, chunk, unroll,
                                      vmap=vmap)
  expected = _reference_round(model, params, block, hp, jax.random.key(1))
  _assert_trees_close(state.params, expected)
  assert int(metrics["num_clients"]) == 3
  if clip == 0.05:
    assert float(metrics["fraction_clipped"]) == 1.0
  if clip == 1e6:
    assert float(metrics["fraction_clipped"]) == 0.0


@pytest.mark.parametrize("vmap", [True, False])
def test_cnn_round_equals_reference_loop(vmap):
  # The CNN's convolutions and pooling have custom gradients
  # (models/conv_ops.py); the round must still be the plain computation.
  model = registry.get_model("cnn", (8, 8, 1), NUM_CLASSES)
  rng = np.random.default_rng(3)
  x = rng.normal(size=(4, 2, 3, 8, 8, 1)).astype(np.float32)
  y = rng.integers(0, NUM_CLASSES, (4, 2, 3)).astype(np.int32)
  mask = np.ones((4, 2, 3), bool)
  mask[1, 1] = False  # one client with an all-padding step
  block = blocks.ClientBlock({"x": x, "y": y}, mask,
                                np.array([True, True, False, True]))
  hp = _hparams(client_lr=0.05, clip=0.5, z=0.0, denom=3.0)
  params, state, _ = _run_round(model, block, hp, chunk=2, unroll=True,
                                vmap=vmap)
  expected = _reference_round(model, params, block, hp, jax.random.key(1))
  _assert_trees_close(state.params, expected)


def test_round_memory_does_not_grow_with_the_cohort():
  # Chunks are sliced from the block inside the scan: XLA's working memory
  # (temp buffers, beyond inputs and outputs) must not hold the block.
  model = _model()
  opt = server_lib.server_optimizer("sgd")
  state = server_lib.init(model.init(jax.random.key(0)), opt)
  fn = jax.jit(dp_fedavg.build_round(
      model, client_lib.client_optimizer("sgd"), opt, clients_per_chunk=2,
      vmap_clients=False, unroll_local_steps=True))

  def temp_bytes(clients):
    block = _block(num_clients=clients, steps=3, batch=16)
    compiled = fn.lower(state, block, _hparams(), jax.random.key(1)).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  small, large = temp_bytes(16), temp_bytes(1024)
  block_bytes = 1024 * 3 * 16 * (INPUT[0] * 4 + 4 + 1)
  assert large < small + 0.05 * block_bytes, (small, large, block_bytes)


def test_no_clip_no_noise_is_plain_fedavg():
  model = _model("logistic")
  block = _block(num_clients=3, full=True)
  hp = _hparams(clip=jnp.inf, z=0.0, denom=3.0)
  params, state, _ = _run_round(model, block, hp)
  # Plain FedAvg: average of the clients' SGD results (equal weights).
  finals = []
  for c in range(3):
    p = params
    for s in range(block.example_mask.shape[1]):
      f = {k: v[c, s] for k, v in block.features.items()}
      g = jax.grad(lambda q: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
          model.apply(q, f["x"]), f["y"])))(p)
      p = jax.tree_util.tree_map(lambda a, b: a - 0.3 * b, p, g)
    finals.append(p)
  expected = jax.tree_util.tree_map(lambda *ps: sum(ps) / 3.0, *finals)
  _assert_trees_close(state.params, expected)


def test_padding_changes_nothing():
  model = _model()
  block = _block(num_clients=3)
  hp = _hparams(clip=0.3, z=1.0, denom=3.0)
  _, state, metrics = _run_round(model, block, hp, chunk=1)
  # Same three clients plus a padded client slot full of NaN, and one extra
  # padded example per batch holding garbage.
  pad = lambda a, value: np.concatenate([a, np.full_like(a[:1], value)])
  padded_x = np.concatenate(
      [pad(block.features["x"], np.nan),
       np.full((4, 3, 1) + INPUT, 1e6, np.float32)], axis=2)
  padded_y = np.concatenate(
      [pad(block.features["y"], 0), np.zeros((4, 3, 1), np.int32)], axis=2)
  padded_mask = np.concatenate(
      [pad(block.example_mask, True), np.zeros((4, 3, 1), bool)], axis=2)
  padded = blocks.ClientBlock(
      {"x": padded_x, "y": padded_y}, padded_mask,
      np.array([True, True, True, False]))
  _, state2, metrics2 = _run_round(model, padded, hp, chunk=2)
  _assert_trees_close(state.params, state2.params, atol=1e-6)
  for k in ("train_loss", "fraction_clipped", "update_norm_p50"):
    assert float(metrics[k]) == pytest.approx(float(metrics2[k]), rel=1e-5)


def test_noise_on_the_average_has_std_z_c_over_denominator():
  model = registry.get_model("mlp_2nn", (20,), 10, hidden=(100,))
  rng = np.random.default_rng(0)
  block = blocks.ClientBlock(
      {"x": rng.normal(size=(2, 1, 2, 20)).astype(np.float32),
       "y": np.zeros((2, 1, 2), np.int32)},
      np.ones((2, 1, 2), bool), np.ones((2,), bool))
  # client_lr = 0: every delta is 0, so the update is the noise alone.
  hp = _hparams(client_lr=1e-30, clip=2.0, z=1.5, denom=40.0)
  params, state, _ = _run_round(model, block, hp)
  diff = np.concatenate([
      np.ravel(a - b) for a, b in zip(jax.tree_util.tree_leaves(state.params),
                                      jax.tree_util.tree_leaves(params))])
  expected_std = 1.5 * 2.0 / 40.0
  n = diff.size
  assert n > 3000
  assert abs(diff.std() / expected_std - 1) < 5 / np.sqrt(2 * n)
  assert stats.kstest(diff / expected_std, "norm").pvalue > 1e-3
  # Different rounds (keys) get different noise; the same key the same.
  _, again, _ = _run_round(model, block, hp, key=1)
  _, other, _ = _run_round(model, block, hp, key=2)
  _assert_trees_close(state.params, again.params, atol=0)
  a = np.ravel(jax.tree_util.tree_leaves(state.params)[0])
  b = np.ravel(jax.tree_util.tree_leaves(other.params)[0])
  assert not np.allclose(a, b)


def test_round_compiles_once_for_new_hyperparameter_values():
  model = _model()
  opt = server_lib.server_optimizer("adam")
  round_fn = dp_fedavg.build_round(model, client_lib.client_optimizer("sgd"),
                                   opt, clients_per_chunk=2)
  traced = jax.jit(chex.assert_max_traces(round_fn, n=1))
  state = server_lib.init(model.init(jax.random.key(0)), opt)
  for r in range(3):
    block = _block(seed=r)
    hp = _hparams(client_lr=0.1 * (r + 1), server_lr=0.01 * (r + 1),
                  clip=0.5 + r, z=float(r), denom=4.0 + r)
    state, _ = traced(state, block, hp, jax.random.key(r))
  assert int(state.round) == 3


@pytest.mark.parametrize("name", ["momentum", "adam", "yogi", "adagrad"])
def test_server_optimizers_apply_the_negated_average_as_gradient(name):
  model = _model("logistic")
  opt = server_lib.server_optimizer(name)
  params = model.init(jax.random.key(0))
  state = server_lib.init(params, opt)
  update = jax.tree_util.tree_map(lambda p: jnp.full_like(p, 0.5), params)
  new = server_lib.step(state, update, 0.1, opt)
  # The same step with optax called directly.
  direct = {"momentum": optax.sgd(0.1, momentum=0.9),
            "adam": optax.adam(0.1, b1=0.9, b2=0.99, eps=1e-3),
            "yogi": optax.yogi(0.1, b1=0.9, b2=0.99, eps=1e-3),
            "adagrad": optax.adagrad(0.1, eps=1e-3)}[name]
  grads = jax.tree_util.tree_map(jnp.negative, update)
  updates, _ = direct.update(grads, direct.init(params), params)
  _assert_trees_close(new.params, optax.apply_updates(params, updates), 1e-6)


def test_all_padding_steps_do_not_move_momentum_clients():
  model = _model("logistic")
  update = client_lib.make_client_update(
      model, client_lib.client_optimizer("sgd", momentum=0.9))
  block = _block(num_clients=1, steps=4, full=True)
  params = model.init(jax.random.key(0))
  mask = block.example_mask[0].copy()
  out_short = update(params, {k: v[0, :2] for k, v in block.features.items()},
                     mask[:2], 0.1)
  mask[2:] = False  # two trailing all-padding steps
  out_long = update(params, {k: v[0] for k, v in block.features.items()},
                    mask, 0.1)
  _assert_trees_close(out_short.delta, out_long.delta, atol=1e-7)
  assert int(out_long.num_examples) == int(mask.sum())


@pytest.mark.parametrize("scheme", ["uniform", "size_proportional"])
def test_per_layer_clipping_round_equals_per_group_reference(scheme):
  model = _model()
  block = _block(valid=np.array([True, True, True, False]))
  hp = _hparams(clip=0.05, z=0.0, denom=3.0)
  opt = server_lib.server_optimizer("sgd")
  params = model.init(jax.random.key(0))
  fn = jax.jit(dp_fedavg.build_round(
      model, client_lib.client_optimizer("sgd"), opt,
      plan_lib.Privatizer.create(per_layer_clipping=scheme)))
  state, metrics = fn(server_lib.init(params, opt), block, hp,
                      jax.random.key(1))
  # Reference: train each client plainly, clip each top-level group g to
  # w_g * C with sum w_g^2 = 1, sum, divide.
  groups = sorted(params)
  sizes = {g: sum(x.size for x in jax.tree_util.tree_leaves(params[g]))
           for g in groups}
  total = sum(sizes.values())
  weights = ({g: 1 / np.sqrt(len(groups)) for g in groups}
             if scheme == "uniform" else
             {g: np.sqrt(sizes[g] / total) for g in groups})
  expected = jax.tree_util.tree_map(np.zeros_like, params)
  for c in range(3):
    one = blocks.ClientBlock(
        {k: v[c:c + 1] for k, v in block.features.items()},
        block.example_mask[c:c + 1], np.array([True]))
    noclip = _hparams(clip=1e9, z=0.0, denom=1.0)
    _, single, _ = _run_round(model, one, noclip, params=params)
    delta = jax.tree_util.tree_map(lambda a, b: np.asarray(a - b),
                                   single.params, params)
    for g in groups:
      norm = np.sqrt(sum(np.sum(np.square(x, dtype=np.float64))
                         for x in jax.tree_util.tree_leaves(delta[g])))
      bound = weights[g] * 0.05
      scale = min(1.0, bound / norm)
      # Every group of every contribution within its own bound.
      assert norm * scale <= bound * (1 + 1e-6)
      expected[g] = jax.tree_util.tree_map(
          lambda t, d: t + scale * d, expected[g], delta[g])
  expected = jax.tree_util.tree_map(lambda p, t: p + t / 3.0, params,
                                    expected)
  _assert_trees_close(state.params, expected)
  assert float(metrics["fraction_clipped"]) == 1.0
