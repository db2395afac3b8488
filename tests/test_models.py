"""Tests for fedjax_dp.models: shapes, sizes, purity, vmap, causality."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_dp.models import charlm
from fedjax_dp.models import cnn
from fedjax_dp.models import logistic
from fedjax_dp.models import mlp
from fedjax_dp.models import registry

# Small configurations so the whole file runs in seconds on a CPU.
# (registry name, input_shape, num_classes, builder kwargs)
SMALL = {
    "logistic": ("logistic", (6, 6), 5, {}),
    "mlp_2nn": ("mlp_2nn", (6, 6), 5, {"hidden": (16, 16)}),
    "cnn": ("cnn", (8, 8, 1), 7, {}),
    "cnn_groupnorm": ("cnn_groupnorm", (8, 8, 3), 5, {}),
    "gru_lm": ("gru_lm", (6,), 11, {"embed_dim": 4, "hidden": 16}),
    "lstm_lm": ("lstm_lm", (6,), 11, {"embed_dim": 4, "hidden": 16}),
    "transformer_lm": (
        "transformer_lm",
        (6,),
        11,
        {"d_model": 16, "num_heads": 2, "num_layers": 2},
    ),
}
LANGUAGE_MODELS = ("gru_lm", "lstm_lm", "transformer_lm")
# One batch size throughout, so each jitted apply compiles once per model.
BATCH = 3


# Cached so that tests share each model's jitted init/apply and their
# compilations; compiling, not running, is what costs time on a CPU.
@functools.lru_cache(maxsize=None)
def _build(case):
  name, input_shape, num_classes, kwargs = SMALL[case]
  return registry.get_model(name, input_shape, num_classes, **kwargs)


def _inputs(model, seed, batch=BATCH):
  # NumPy, not jax.random: eager jax.random ops each compile a kernel.
  rng = np.random.default_rng(seed)
  shape = (batch, *model.input_shape)
  if model.name in LANGUAGE_MODELS:
    return rng.integers(0, model.num_classes, shape).astype(np.int32)
  return rng.standard_normal(shape).astype(np.float32)


def _labels(model, seed, batch=BATCH):
  rng = np.random.default_rng(seed)
  if model.name in LANGUAGE_MODELS:
    shape = (batch, *model.input_shape)  # Next-token targets per position.
  else:
    shape = (batch,)
  return rng.integers(0, model.num_classes, shape).astype(np.int32)


def _num_params(params):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def _loss(model, params, x, y):
  logits = model.apply(params, x)
  logp = jax.nn.log_softmax(logits)
  return -jnp.mean(jnp.take_along_axis(logp, y[..., None], axis=-1))


@pytest.mark.parametrize("case", sorted(SMALL))
def test_output_shape_and_params(case):
  model = _build(case)
  params = model.init(jax.random.key(0))
  assert isinstance(params, dict)
  for leaf in jax.tree.leaves(params):
    assert leaf.dtype == jnp.float32
  x = _inputs(model, 1)
  logits = model.apply(params, x)
  if model.name in LANGUAGE_MODELS:
    assert logits.shape == (BATCH, *model.input_shape, model.num_classes)
  else:
    assert logits.shape == (BATCH, model.num_classes)
  assert logits.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(logits)))


@pytest.mark.parametrize(
    "num_classes, expected", [(62, 1_690_046), (10, 1_663_370)]
)
def test_mcmahan_cnn_parameter_count(num_classes, expected):
  model = cnn.cnn_mcmahan((28, 28, 1), num_classes)
  shapes = jax.eval_shape(model.init, jax.random.key(0))
  assert _num_params(shapes) == expected


@pytest.mark.parametrize(
    "num_classes, expected",
    # McMahan et al. (2017) quote 199,210 for MNIST (784-200-200-10).
    [(10, 199_210), (62, 209_662)],
)
def test_2nn_parameter_count(num_classes, expected):
  model = mlp.mlp_2nn((28, 28), num_classes)
  shapes = jax.eval_shape(model.init, jax.random.key(0))
  assert _num_params(shapes) == expected


def test_logistic_parameter_count():
  model = logistic.logistic_regression((28, 28), 10)
  assert _num_params(jax.eval_shape(model.init, jax.random.key(0))) == 7850


def test_cnn_accepts_missing_channel_axis():
  model = _build("cnn")  # input_shape (8, 8, 1)
  params = model.init(jax.random.key(0))
  x = _inputs(model, 1)[..., 0]
  np.testing.assert_array_equal(
      model.apply(params, x), model.apply(params, x[..., None])
  )


@pytest.mark.parametrize("case", sorted(SMALL))
def test_deterministic_apply_and_init(case):
  model = _build(case)
  p0 = model.init(jax.random.key(0))
  p0_again = model.init(jax.random.key(0))
  p1 = model.init(jax.random.key(1))
  jax.tree.map(np.testing.assert_array_equal, p0, p0_again)
  differs = [
      not np.array_equal(a, b)
      for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(p1))
  ]
  assert any(differs)
  x = _inputs(model, 2)
  np.testing.assert_array_equal(model.apply(p0, x), model.apply(p0, x))
  assert not np.array_equal(model.apply(p0, x), model.apply(p1, x))


@pytest.mark.parametrize("case", sorted(SMALL))
def test_vmap_over_clients_matches_per_client(case):
  model = _build(case)
  num_clients = 3
  per_client = [model.init(jax.random.key(i)) for i in range(num_clients)]
  stacked = jax.tree.map(lambda *ps: np.stack(ps), *per_client)
  xs = np.stack([_inputs(model, seed) for seed in range(num_clients)])
  batched = jax.jit(jax.vmap(model.apply))(stacked, xs)
  for i, params_i in enumerate(per_client):
    np.testing.assert_allclose(
        batched[i], model.apply(params_i, xs[i]), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("case", LANGUAGE_MODELS)
def test_language_models_are_causal(case):
  model = _build(case)
  params = model.init(jax.random.key(0))
  seq_len = model.input_shape[0]
  x = _inputs(model, 1)
  apply = model.apply
  base = apply(params, x)
  for t in range(seq_len - 1):
    changed = x.copy()
    changed[:, t + 1] = (x[:, t + 1] + 1) % model.num_classes
    out = apply(params, changed)
    np.testing.assert_allclose(out[:, : t + 1], base[:, : t + 1], atol=1e-6)
    # The change is seen from position t + 1 on (the test is not vacuous).
    assert not np.allclose(out[:, t + 1], base[:, t + 1], atol=1e-6)


def test_transformer_accepts_shorter_sequences():
  model = _build("transformer_lm")
  params = model.init(jax.random.key(0))
  x = _inputs(model, 1)
  full = model.apply(params, x)
  short = model.apply(params, x[:, :4])
  np.testing.assert_allclose(short, full[:, :4], atol=1e-6)


def test_transformer_rejects_bad_heads():
  with pytest.raises(ValueError, match="num_heads"):
    charlm.transformer_lm(11, d_model=10, num_heads=4)


@pytest.mark.parametrize("case", sorted(SMALL))
def test_sgd_reduces_loss(case):
  model = _build(case)
  # The small recurrent models' gradients are small at init; they need
  # larger steps.
  lr = {"gru_lm": 1.0, "lstm_lm": 4.0}.get(case, 0.1)
  params = model.init(jax.random.key(0))
  x = _inputs(model, 1)
  y = _labels(model, 2)

  @jax.jit
  def step(params):
    loss, grads = jax.value_and_grad(lambda p: _loss(model, p, x, y))(params)
    return jax.tree.map(lambda p, g: p - lr * g, params, grads), loss

  losses = []
  for _ in range(10):
    params, loss = step(params)
    losses.append(float(loss))
  assert np.all(np.isfinite(losses))
  assert losses[-1] < 0.9 * losses[0]


def test_registry_names_and_alias():
  assert set(registry.NAMES) >= {
      "logistic", "mlp_2nn", "2nn", "cnn", "cnn_groupnorm", "gru_lm",
      "transformer_lm",
  }
  model = registry.get_model("2nn", (28, 28), 10)
  assert model.name == "mlp_2nn"
  assert model.input_shape == (28, 28)
  assert model.num_classes == 10
  lm = registry.get_model("gru_lm", (80,), 86)
  assert lm.input_shape == (80,)
  assert lm.num_classes == 86
  # The Shakespeare model of Reddi et al. (2021): 8-dim embedding, two
  # LSTM layers of 256: 4 * 256 * (8 + 256 + 1) + 4 * 256 * (256 + 256 + 1)
  # + 90 * 8 + 257 * 90 parameters.
  lstm = registry.get_model("lstm_lm", (80,), 90)
  shapes = jax.eval_shape(lstm.init, jax.random.key(0))
  assert sum(np.prod(a.shape) for a in jax.tree_util.tree_leaves(shapes)) == (
      4 * 256 * 265 + 4 * 256 * 513 + 90 * 8 + 257 * 90)


def test_registry_unknown_name():
  with pytest.raises(ValueError) as info:
    registry.get_model("resnet", (28, 28), 10)
  message = str(info.value)
  assert "model" in message
  assert "resnet" in message
  for name in registry.NAMES:
    assert name in message


def test_registry_language_model_needs_seq_len_shape():
  with pytest.raises(ValueError, match="seq_len"):
    registry.get_model("transformer_lm", (8, 8), 10)
