"""Adversarial and malformed client data against the round's guarantees.

Each test here is a case where one client's data could move the released
sum by more than the ledger's sensitivity, or leave a message without its
noise: cancelling gradients under the factored round's Gram-matrix norm,
non-finite updates under local noise, non-finite examples under DP-SGD, and
NaN reaching other clients through padding. The contract suite
(test_privacy_contract.py) checks the same properties over every round
variant and mechanism.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from fedjax_dp import client as client_lib
from fedjax_dp import server as server_lib
from fedjax_dp.algorithms import dp_fedavg
from fedjax_dp.data import blocks
from fedjax_dp.data import population as population_lib
from fedjax_dp.models import registry
from fedjax_dp.privacy import clipping
from fedjax_dp.privacy import plan as plan_lib

SHAPE = (8, 8, 1)
CLASSES = 10
CLIP = 0.5


@functools.lru_cache(maxsize=None)
def _model(name):
  kwargs = {"hidden": (32, 16)} if name == "mlp_2nn" else {}
  return registry.get_model(name, SHAPE, CLASSES, **kwargs)


@functools.lru_cache(maxsize=None)
def _round(name, shape, **kwargs):
  model = _model(name)
  client_opt = client_lib.client_optimizer("sgd")
  server_opt = server_lib.server_optimizer("sgd")
  if shape == "factored":
    return jax.jit(dp_fedavg.build_round(
        model, client_opt, server_opt, clients_per_chunk=2,
        vmap_clients=False, factored=True))
  return jax.jit(dp_fedavg.build_round(
      model, client_opt, server_opt, plan_lib.Privatizer.create(**kwargs),
      clients_per_chunk=2))


def _hparams(z=0.0, clip=CLIP, **kwargs):
  return dp_fedavg.RoundHparams.create(
      client_lr=0.1, server_lr=1.0, clip_norm=clip, noise_multiplier=z,
      denominator=1.0, **kwargs)


def _flat(tree):
  return np.concatenate([np.ravel(np.asarray(x, np.float64))
                         for x in jax.tree_util.tree_leaves(tree)])


def _release(fn, params, block, hparams, key=0):
  """The round's released sum: the server step is SGD with lr 1 and the
  denominator is 1."""
  state = server_lib.init(params, server_lib.server_optimizer("sgd"))
  new, metrics = fn(state, block, hparams, jax.random.key(key))
  return _flat(new.params) - _flat(params), jax.device_get(metrics)


# ---------------------------------------------------------------------------
# The factored round's clip bounds the true update.


def _nearly_uniform(model, scale):
  """Initial params with the last dense layer scaled down: predictions are
  uniform up to `scale` times the features' size."""
  params = dict(model.init(jax.random.key(0)))
  last = sorted((n for n in params if n.startswith("Dense_")),
                key=lambda n: int(n.split("_")[1]))[-1]
  params[last] = jax.tree_util.tree_map(lambda v: v * scale, params[last])
  return params


def _cancelling_block(magnitude, seed=0):
  """Slot 0: one input of norm `magnitude`, once with every label, in one
  batch (its per-example gradients nearly cancel); slot 1: padding."""
  rng = np.random.default_rng(seed)
  v = rng.normal(size=SHAPE).astype(np.float32)
  x = np.zeros((2, 1, CLASSES) + SHAPE, np.float32)
  x[0, 0] = (magnitude * v / np.linalg.norm(v))[None]
  y = np.zeros((2, 1, CLASSES), np.int32)
  y[0, 0] = np.arange(CLASSES)
  mask = np.zeros((2, 1, CLASSES), bool)
  mask[0] = True
  return blocks.ClientBlock({"x": x, "y": y}, mask, np.array([True, False]))


# (model, input magnitude, scale of the last layer): each makes the float32
# Gram-matrix sum of the update's squared norm cancel to about 0 while the
# true update is several times the clip norm.
CANCELLING = [("cnn", 1e6, 1e-9), ("logistic", 1e6, 1e-9),
              ("mlp_2nn", 1e7, 1e-11)]


@pytest.mark.parametrize("name,magnitude,scale", CANCELLING)
def test_factored_round_clips_a_cancelling_client(name, magnitude, scale):
  params = _nearly_uniform(_model(name), scale)
  block = _cancelling_block(magnitude)
  plain, _ = _release(_round(name, "plain"), params, block, _hparams())
  released, metrics = _release(_round(name, "factored"), params, block,
                               _hparams())
  # The reference sees an update well above the clip (so it clips it).
  assert float(np.linalg.norm(plain)) == pytest.approx(CLIP, rel=1e-4)
  # The factored round must bound it too: its norm is a certified upper
  # bound of the true one, never the cancelled Gram sum.
  assert float(np.linalg.norm(released)) <= CLIP * (1 + 1e-5)
  assert float(metrics["update_norm_max"]) > CLIP


def test_gram_bound_is_above_the_exact_norm_and_tight_on_ordinary_data():
  rng = np.random.default_rng(0)
  n, p, q = 12, 65, 20
  u = 2.0 ** -24
  for trial in range(200):
    a = rng.normal(size=(n, p)).astype(np.float32)
    g = rng.normal(size=(n, q)).astype(np.float32)
    if trial % 2:
      # Cancelling rows: equal inputs, opposite gradients, tiny remainder.
      a[1::2] = a[::2]
      g[1::2] = -g[::2] + np.float32(10.0 ** -rng.uniform(2, 7)) * (
          rng.normal(size=g[::2].shape).astype(np.float32))
      a *= np.float32(10.0 ** rng.uniform(0, 12))
    a_ones = np.concatenate([a, np.ones((n, 1), np.float32)], axis=1)
    gram_a = jnp.asarray(a) @ jnp.asarray(a).T + 1.0
    gram_g = jnp.asarray(g) @ jnp.asarray(g).T
    bound = float(clipping.gram_norm_sq_upper_bound(gram_a, gram_g, p + 1, q))
    exact = float(np.sum(np.square(
        a_ones.astype(np.float64).T @ g.astype(np.float64))))
    assert bound >= exact, trial
    if trial % 2 == 0:
      # Ordinary rows: above by at most the rounding allowance K T^2.
      t = float(np.sum(np.linalg.norm(a_ones.astype(np.float64), axis=1)
                       * np.linalg.norm(g.astype(np.float64), axis=1)))
      assert bound <= exact + 2 * (p + q + n * n + 8) * u * t * t, trial


# ---------------------------------------------------------------------------
# Client-side noise: a non-finite participant still sends noise.


@pytest.mark.parametrize("placement", ["local", "distributed"])
def test_a_non_finite_participant_still_sends_its_noise(placement):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 1, 4) + SHAPE).astype(np.float32)
  x[0, 0, 0, 0, 0, 0] = np.nan  # the one participant's update is NaN
  block = blocks.ClientBlock(
      {"x": x, "y": np.zeros((2, 1, 4), np.int32)}, np.ones((2, 1, 4), bool),
      np.array([True, False]))
  z = 1.0
  fn = _round("mlp_2nn", "plain", noise_placement=placement)
  released, metrics = _release(fn, _model("mlp_2nn").init(jax.random.key(0)),
                               block, _hparams(z=z))
  assert int(metrics["num_nonfinite"]) == 1
  # Not an exact (data-revealing) value: N(0, (z C)^2) in every coordinate.
  assert np.all(np.isfinite(released))
  assert stats.kstest(released / (z * CLIP), "norm").pvalue > 1e-4


# ---------------------------------------------------------------------------
# DP-SGD: a non-finite or overflowing example does not remove its client.


def test_dp_sgd_drops_a_non_finite_example_not_its_client():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 1, 6) + SHAPE).astype(np.float32)
  y = rng.integers(0, CLASSES, (2, 1, 6)).astype(np.int32)
  mask = np.zeros((2, 1, 6), bool)
  mask[0] = True
  fn = _round("logistic", "plain", example_dp=True)
  params = _model("logistic").init(jax.random.key(0))
  hp = _hparams(clip=np.inf, example_clip_norm=1.0,
                example_noise_multiplier=0.0)
  bad = x.copy()
  bad[0, 0, 1, 0, 0, 0] = np.nan
  bad[0, 0, 4, 1, 1, 0] = np.float32(3e38)  # finite, overflows the logits
  block = lambda xs, m: blocks.ClientBlock({"x": xs, "y": y}, m,
                                              np.array([True, False]))
  got, metrics = _release(fn, params, block(bad, mask), hp)
  assert int(metrics["num_nonfinite"]) == 0
  assert int(metrics["num_clients"]) == 1
  # It counts as if those two examples were padding (zero-out): they
  # contribute 0, the other four as usual.
  zeroed = mask.copy()
  zeroed[0, 0, [1, 4]] = False
  want, _ = _release(fn, params, block(x, zeroed), hp)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  assert np.linalg.norm(want) > 0


# ---------------------------------------------------------------------------
# Padding never holds another client's data; masks select.


def _population(first_nan=True):
  rng = np.random.default_rng(2)
  sizes = [5, 2, 3, 1]
  clients = []
  for k, n in enumerate(sizes):
    x = rng.normal(size=(n,) + SHAPE).astype(np.float32)
    if k == 0 and first_nan:
      x[0, 0, 0, 0] = np.nan
    clients.append({"x": x, "y": rng.integers(0, CLASSES, n).astype(np.int32)})
  return population_lib.FederatedPopulation.from_client_arrays(
      [f"c{k}" for k in range(len(sizes))], clients)


def _block_of(population, slots=6):
  n = population.num_clients
  indices = np.zeros(slots, np.int64)
  indices[:n] = np.arange(n)
  made = blocks.make_block(population, indices, np.arange(slots) < n,
                           batch_size=5, epochs=1, num_steps=1,
                           key=jax.random.key(0))
  return made


def test_padding_holds_zeros_not_another_clients_examples():
  made = _block_of(_population())
  for name, array in made.features.items():
    padded = array[~made.example_mask]
    assert padded.size and not np.any(padded), name
  # Padded slots too.
  assert not np.any(made.features["x"][~made.client_mask])


def test_one_clients_nan_excludes_that_client_only():
  made = _block_of(_population())
  block = blocks.ClientBlock(made.features, made.example_mask,
                                made.client_mask)
  params = _model("mlp_2nn").init(jax.random.key(0))
  for shape in ("plain", "factored"):
    fn = _round("mlp_2nn", shape)
    got, metrics = _release(fn, params, block, _hparams())
    assert int(metrics["num_nonfinite"]) == 1, shape
    assert int(metrics["num_clients"]) == 3, shape
    assert np.isfinite(float(metrics["train_loss"])), shape
    # The release is the other clients' clipped sum.
    without = block._replace(client_mask=block.client_mask & (
        np.arange(6) != 0))
    want, _ = _release(fn, params, without, _hparams())
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("shape,kwargs", [
    ("plain", {}), ("factored", {}), ("plain", {"example_dp": True})])
def test_nan_in_a_clients_padded_examples_changes_nothing(shape, kwargs):
  made = _block_of(_population(first_nan=False))
  clean = blocks.ClientBlock(made.features, made.example_mask,
                                made.client_mask)
  x = made.features["x"].copy()
  x[~made.example_mask] = np.nan  # whatever a block holds in padding
  dirty = clean._replace(features={"x": x, "y": made.features["y"]})
  fn = _round("mlp_2nn", shape, **kwargs)
  params = _model("mlp_2nn").init(jax.random.key(0))
  hp = _hparams(example_clip_norm=1.0) if kwargs else _hparams()
  a, ma = _release(fn, params, clean, hp)
  b, mb = _release(fn, params, dirty, hp)
  assert int(mb["num_nonfinite"]) == 0
  np.testing.assert_array_equal(b, a)
  assert float(mb["train_loss"]) == float(ma["train_loss"])
