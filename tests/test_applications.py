"""The application datasets (fraud across banks, IoT sensors), the conv1d
model, and evaluation's metrics for binary tasks."""

import importlib.util
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_dp import diagnostics
from fedjax_dp import evaluation
from fedjax_dp.data import builtin
from fedjax_dp.data import fraud
from fedjax_dp.data import iot
from fedjax_dp.data import population as population_lib
from fedjax_dp.models import logistic
from fedjax_dp.models import registry

_ROOT = pathlib.Path(__file__).resolve().parent.parent


def _per_client(population, name):
  return [population.features[name][a:b]
          for a, b in zip(population.offsets[:-1], population.offsets[1:])]


# Fraud across banks.


def test_fraud_banks_are_deterministic_for_a_seed():
  a = fraud.fraud_banks(6, median_transactions=800, seed=3)
  b = fraud.fraud_banks(6, median_transactions=800, seed=3)
  c = fraud.fraud_banks(6, median_transactions=800, seed=4)
  assert a.client_ids == b.client_ids
  assert np.array_equal(a.offsets, b.offsets)
  assert np.array_equal(a.features["x"], b.features["x"])
  assert np.array_equal(a.features["y"], b.features["y"])
  assert not np.array_equal(a.features["y"], c.features["y"])


def test_fraud_banks_shapes_sizes_and_fraud_rates():
  population, profiles = fraud.fraud_banks_with_profiles(
      30, median_transactions=1000, size_sigma=1.0, seed=0)
  x, y = population.features["x"], population.features["y"]
  assert x.dtype == np.float32 and x.shape[1:] == (fraud.NUM_FEATURES,)
  assert len(fraud.FEATURE_NAMES) == fraud.NUM_FEATURES == 24
  assert y.dtype == np.int32 and set(np.unique(y)) == {0, 1}
  assert np.all(np.isfinite(x))
  sizes = np.diff(population.offsets)
  assert len(sizes) == 30
  assert sizes.min() >= fraud.MIN_TRANSACTIONS and sizes.max() <= 10_000
  # Log-normal: the banks differ in size a lot.
  assert sizes.max() > 4 * sizes.min()
  # The merchant category is one-hot before standardisation.
  raw = x[:, 3:11] * np.array(fraud.FEATURE_SCALES[3:11]) + np.array(
      fraud.FEATURE_CENTRES[3:11])
  assert np.allclose(raw.sum(axis=1), 1.0, atol=1e-5)
  rates = []
  for bank, labels in zip(profiles, _per_client(population, "y")):
    n = labels.size
    assert n == bank.num_transactions
    # Every bank holds at least one fraud, and its rate is its drawn rate
    # (in the documented range) up to rounding.
    assert labels.sum() >= 1
    assert 0.005 <= bank.fraud_rate <= 0.02
    assert abs(labels.mean() - bank.fraud_rate) <= 0.5 / n + 1e-12
    rates.append(labels.mean())
  assert 0.005 - 0.5 / fraud.MIN_TRANSACTIONS <= min(rates)
  assert max(rates) <= 0.02 + 0.5 / fraud.MIN_TRANSACTIONS
  # The rates differ per bank.
  assert max(rates) - min(rates) > 0.005


def test_fraud_is_learnable_and_partly_bank_specific():
  population, profiles = fraud.fraud_banks_with_profiles(
      8, median_transactions=3000, seed=1)
  xs, ys = _per_client(population, "x"), _per_client(population, "y")
  for x, y in zip(xs, ys):
    # The frauds' mean risk score moves along the shared direction and the
    # bank's own one, so it differs from the legitimate mean.
    shift = x[y == 1, 19:].mean(axis=0) - x[y == 0, 19:].mean(axis=0)
    assert np.linalg.norm(shift) > 0.5
  directions = np.stack([p.fraud_direction for p in profiles])
  assert np.allclose(np.linalg.norm(directions, axis=1), 1.0)
  assert np.linalg.matrix_rank(directions) > 1


def test_fraud_banks_builtin_split():
  ds = builtin.load("fraud_banks", num_banks=10, median_transactions=600)
  assert ds.input_shape == (24,) and ds.num_classes == 2
  assert len(ds.train.client_ids) == 8 and len(ds.eval.client_ids) == 2
  assert not set(ds.train.client_ids) & set(ds.eval.client_ids)
  again = builtin.load("fraud_banks", num_banks=10, median_transactions=600)
  assert np.array_equal(ds.train.features["x"], again.train.features["x"])
  assert ds.eval.client_ids == again.eval.client_ids


@pytest.mark.parametrize("kwargs, field, allowed", [
    (dict(num_banks=1), "num_banks", "[2, 10000]"),
    (dict(num_banks="24"), "num_banks", "an int"),
    (dict(median_transactions=100), "median_transactions", "[500, 1000000]"),
    (dict(size_sigma=-0.5), "size_sigma", "[0.0, 3.0]"),
    (dict(min_fraud_rate=0.7), "min_fraud_rate", "[0.0, 0.5]"),
    (dict(min_fraud_rate=0.02, max_fraud_rate=0.01), "max_fraud_rate",
     "[0.02, 0.5]"),
    (dict(bank_shift=float("nan")), "bank_shift", "[0.0, 10.0]"),
    (dict(eval_fraction=1.0), "eval_fraction", "(0, 1)"),
])
def test_fraud_banks_bad_arguments_name_the_field(kwargs, field, allowed):
  with pytest.raises(ValueError, match=field) as info:
    builtin.load("fraud_banks", **kwargs)
  assert allowed in str(info.value)


# IoT sensors.


def test_iot_devices_are_deterministic_for_a_seed():
  a = iot.iot_devices(40, seed=5)
  b = iot.iot_devices(40, seed=5)
  c = iot.iot_devices(40, seed=6)
  assert np.array_equal(a.offsets, b.offsets)
  assert np.array_equal(a.features["x"], b.features["x"])
  assert np.array_equal(a.features["y"], b.features["y"])
  assert not np.array_equal(a.features["x"][:5], c.features["x"][:5])


def test_iot_devices_shapes_balance_and_heterogeneity():
  population, profiles = iot.iot_devices_with_profiles(
      2000, min_windows=5, max_windows=20, window_length=40, num_classes=5,
      seed=0)
  x, y = population.features["x"], population.features["y"]
  assert x.dtype == np.float32 and x.shape[1:] == (40, 3)
  assert y.dtype == np.int32 and y.min() >= 0 and y.max() <= 4
  sizes = np.diff(population.offsets)
  assert sizes.min() >= 5 and sizes.max() <= 20
  # Balanced classes overall (1/5 each in expectation).
  fractions = np.bincount(y, minlength=5) / y.size
  assert np.all(np.abs(fractions - 0.2) < 0.03), fractions
  # Every device's labels are its activities, each present at least once.
  seen = []
  for device, labels in zip(profiles, _per_client(population, "y")):
    assert set(np.unique(labels)) == set(device.activities.tolist())
    seen.append(len(device.activities))
  counts = np.bincount(seen, minlength=6) / len(seen)
  # k = 1 with probability 0.15, 2 with 0.25.
  assert 0.11 < counts[1] < 0.19 and 0.20 < counts[2] < 0.30
  assert counts[3:].sum() > 0.5
  # Calibration differs per device.
  gains = np.stack([d.gain for d in profiles])
  noise = np.array([d.noise_std for d in profiles])
  assert gains.std() > 0.1 and noise.min() >= 0.03 and noise.max() <= 0.3


def test_iot_activities_differ_in_signal():
  population = iot.iot_devices(300, seed=2)
  x, y = population.features["x"], population.features["y"]
  # Motion energy around each window's mean: idle lowest, running highest.
  energy = x.std(axis=1).sum(axis=1)
  per_class = [energy[y == c].mean() for c in range(5)]
  assert per_class[0] == min(per_class) and per_class[2] == max(per_class)


def test_iot_sensors_builtin():
  ds = builtin.load("iot_sensors", num_devices=50, window_length=16,
                    num_classes=4)
  assert ds.input_shape == (16, 3) and ds.num_classes == 4
  assert len(ds.train.client_ids) == 40 and len(ds.eval.client_ids) == 10
  assert ds.train.features["y"].max() < 4


@pytest.mark.parametrize("kwargs, field, allowed", [
    (dict(num_devices=1), "num_devices", "[2, 1000000]"),
    (dict(min_windows=0), "min_windows", "[1, 10000]"),
    (dict(min_windows=8, max_windows=4), "max_windows", "[8, 10000]"),
    (dict(window_length=4), "window_length", "[8, 4096]"),
    (dict(num_classes=7), "num_classes", "[2, 6]"),
    (dict(num_classes=1.5), "num_classes", "[2, 6]"),
    (dict(eval_fraction=0.0), "eval_fraction", "(0, 1)"),
])
def test_iot_sensors_bad_arguments_name_the_field(kwargs, field, allowed):
  with pytest.raises(ValueError, match=field) as info:
    builtin.load("iot_sensors", **kwargs)
  assert allowed in str(info.value)


# The conv1d model.


def test_conv1d_builds_with_the_right_output_shape():
  model = registry.get_model("conv1d", (32, 3), 5)
  assert model.name == "conv1d"
  params = model.init(jax.random.key(0))
  assert sum(p.size for p in jax.tree_util.tree_leaves(params)) == 3013
  logits = model.apply(params, jnp.ones((7, 32, 3)))
  assert logits.shape == (7, 5) and logits.dtype == jnp.float32
  # One channel given as [batch, time]; odd lengths and other widths.
  mono = registry.get_model("conv1d", (33,), 4, channels=(8, 8, 8),
                            kernel_size=3)
  out = mono.apply(mono.init(jax.random.key(1)), jnp.ones((2, 33)))
  assert out.shape == (2, 4)


def test_conv1d_is_shift_tolerant_and_trains():
  model = registry.get_model("conv1d", (32, 3), 2)
  params = model.init(jax.random.key(0))
  t = jnp.arange(32) / 20.0
  slow = jnp.stack([jnp.sin(2 * jnp.pi * 1.0 * t)] * 3, axis=-1)
  fast = jnp.stack([jnp.sin(2 * jnp.pi * 6.0 * t)] * 3, axis=-1)
  x = jnp.stack([slow, fast] * 4)
  y = jnp.array([0, 1] * 4)

  def loss(p):
    logits = model.apply(p, x)
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(8), y])

  grad = jax.jit(jax.value_and_grad(loss))
  first, _ = grad(params)
  for _ in range(30):
    value, g = grad(params)
    params = jax.tree_util.tree_map(lambda p, d: p - 0.5 * d, params, g)
  assert value < 0.5 * first


@pytest.mark.parametrize("shape", [(8, 8, 1), ()])
def test_conv1d_refuses_other_shapes(shape):
  with pytest.raises(ValueError, match="input_shape"):
    registry.get_model("conv1d", shape, 3)


# Evaluation metrics for binary tasks.


@pytest.mark.parametrize("labels, scores, auprc, recall", [
    # Perfectly separated.
    ([0, 1, 0, 1, 1], [0.1, 0.9, 0.2, 0.8, 0.7], 1.0, 1.0),
    # Ranked 1, 0, 1, 0: precision/recall after each is 1/.5, .5/.5,
    # 2/3 / 1, .5/1; AP = .5 * 1 + .5 * 2/3; only the first threshold
    # reaches precision 0.9, at recall .5.
    ([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.1], 0.5 + 1 / 3, 0.5),
    # The negative first: no threshold reaches precision 0.9; AP = 1 * .5.
    ([0, 1], [0.9, 0.1], 0.5, 0.0),
    # All tied: one threshold, precision 2/3 at recall 1.
    ([1, 0, 1], [0.5, 0.5, 0.5], 2 / 3, 0.0),
])
def test_binary_ranking_metrics_by_hand(labels, scores, auprc, recall):
  metrics = evaluation.binary_ranking_metrics(np.array(labels),
                                              np.array(scores))
  assert metrics["eval_auprc"] == pytest.approx(auprc)
  assert metrics["eval_recall_at_precision_90"] == pytest.approx(recall)


@pytest.mark.parametrize("labels, scores", [
    ([0, 0, 0], [0.1, 0.5, 0.9]),  # no positive example
    ([0, 1, 0], [0.1, float("nan"), 0.9]),  # a diverged model
    ([], []),
])
def test_binary_ranking_metrics_are_nan_when_undefined(labels, scores):
  metrics = evaluation.binary_ranking_metrics(np.array(labels, np.int32),
                                              np.array(scores))
  assert math.isnan(metrics["eval_auprc"])
  assert math.isnan(metrics["eval_recall_at_precision_90"])


def _population(x, y, sizes):
  return population_lib.FederatedPopulation(
      tuple(f"c{i}" for i in range(len(sizes))),
      {"x": np.asarray(x, np.float32), "y": np.asarray(y, np.int32)},
      np.concatenate([[0], np.cumsum(sizes)]))


def test_evaluate_reports_ranking_metrics_for_binary_models():
  # logit_1 - logit_0 = x, so the score of class 1 is sigmoid(x): the same
  # ranking as x. Batches of 2 pad the last one.
  model = logistic.logistic_regression((1,), 2)
  params = {"Dense_0": {"kernel": jnp.array([[0.0, 1.0]]),
                        "bias": jnp.zeros((2,))}}
  x = [[0.9], [0.8], [0.7], [0.1], [-3.0]]
  y = [1, 0, 1, 0, 0]
  metrics = evaluation.evaluate(model, params, _population(x, y, [2, 3]),
                                batch_size=2)
  # Ranked 1, 0, 1, 0, 0: AP = .5 * 1 + .5 * 2/3.
  assert metrics["eval_auprc"] == pytest.approx(0.5 + 1 / 3)
  assert metrics["eval_recall_at_precision_90"] == pytest.approx(0.5)
  assert metrics["eval_accuracy"] == pytest.approx(3 / 5)
  separated = evaluation.evaluate(
      model, params, _population(x, [1, 1, 1, 0, 0], [5]))
  assert separated["eval_auprc"] == 1.0
  assert separated["eval_recall_at_precision_90"] == 1.0


def test_evaluate_has_no_ranking_metrics_for_other_models():
  model = logistic.logistic_regression((1,), 3)
  params = model.init(jax.random.key(0))
  metrics = evaluation.evaluate(
      model, params, _population([[0.5], [1.0]], [1, 2], [2]))
  assert "eval_accuracy" in metrics
  assert "eval_auprc" not in metrics
  assert "eval_recall_at_precision_90" not in metrics


def test_ranking_metrics_are_classified_and_documented():
  readme = (_ROOT / "README.md").read_text()
  section = readme[readme.index("## Run directory"):]
  section = section[:section.index("\n## ", 1)]
  for name in ("eval_auprc", "eval_recall_at_precision_90"):
    assert diagnostics.METRICS[name][0] == diagnostics.RELEASED
    assert f"`{name}`" in section, name


# The experiments.


def _experiment(name):
  spec = importlib.util.spec_from_file_location(
      name, _ROOT / "experiments" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("variant", ["get_config", "get_smoke_config"])
def test_fraud_experiment_samples_every_training_bank(variant):
  config = getattr(_experiment("fraud_banks"), variant)()
  ds = builtin.load(config.dataset, seed=config.seed,
                    **config.dataset_kwargs)
  assert config.sampling == "fixed"
  assert config.cohort_size == len(ds.train.client_ids)
  # Record-level DP: a per-transaction guarantee, no bank-level noise.
  assert config.example_clip_norm is not None
  assert config.example_noise_multiplier > 0 and config.noise_multiplier == 0
  assert config.delta < 1 / (ds.train.features["y"].size
                             + ds.eval.features["y"].size)


def test_iot_experiment_is_cross_device_user_level():
  config = _experiment("iot_sensors").get_config()
  assert config.sampling == "poisson" and config.accountant == "pld"
  assert config.model == "conv1d" and config.example_clip_norm is None
  assert 100 <= config.cohort_size <= 200 and config.noise_multiplier > 0
  assert config.delta < 1 / config.dataset_kwargs["num_devices"]
