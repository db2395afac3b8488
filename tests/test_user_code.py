"""A user's own flax model and in-memory data: runner.run, sweeps, the CLI
(resume included), what the run directory records, and the README example."""

import json
import pathlib
import re
import shutil

import flax.linen as nn
import jax
import numpy as np
import pytest

from fedjax_dp import cli
from fedjax_dp import config as config_lib
from fedjax_dp import import_paths
from fedjax_dp import losses
from fedjax_dp import runner
from fedjax_dp import simulation
from fedjax_dp import sweep
from fedjax_dp.data import in_memory
from fedjax_dp.models import user_model
from helpers import user_code

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
QUIET = dict(progress=False, log=lambda s: None)


def _config(**changes) -> config_lib.Config:
  return config_lib.Config(
      name="own", rounds=4, cohort_size=8, eval_every=2, batch_size=4,
      local_epochs=1, noise_multiplier=0.5, delta=1e-3,
      checkpoint_every=2).replace(**changes)


@pytest.fixture(scope="module")
def data():
  return user_code.make_dataset()


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def test_a_user_module_on_user_data_trains_and_is_recorded(tmp_path, data):
  messages = []
  result = runner.run(_config(rounds=12, noise_multiplier=0.3, eval_every=12,
                              accountant="rdp",
                              client_lr=0.5),
                      dataset=data, model=user_code.TinyNet(hidden=16),
                      run_dir=tmp_path, progress=False, log=messages.append)
  # It learned: half the labels are of one class; the model does better.
  assert result.summary["eval_accuracy"] > 0.65
  recorded = json.loads((tmp_path / "config.json").read_text())
  assert recorded["model"] == "helpers.user_code:TinyNet"
  assert recorded["model_kwargs"] == {"hidden": 16}
  assert recorded["dataset"] == "<tiny_shifted>"
  assert jax.tree_util.tree_map(np.shape, result.params)["Dense_0"][
      "kernel"] == (user_code.FEATURES, 16)
  # The log says which round ran, and why not the factored one.
  round_line = next(m for m in messages if m.startswith("round:"))
  assert "per-client" in round_line and "TinyNet" in round_line


def test_cli_resume_rebuilds_the_model_and_data_from_the_run_directory(
    tmp_path, capsys):
  # The data by its builder's import path, the model as an object whose
  # class is importable: config.json can rebuild both.
  cfg = _config(dataset="helpers.user_code:make_dataset",
                dataset_kwargs={"num_clients": 40})
  whole = runner.run(cfg, model=user_code.TinyNet(hidden=12),
                     run_dir=tmp_path / "a", **QUIET)
  shutil.copytree(tmp_path / "a", tmp_path / "b")
  # Interrupted after round 2: its last checkpoint and summary are gone.
  newest = max((tmp_path / "b" / "checkpoints").iterdir())
  shutil.rmtree(newest)
  (tmp_path / "b" / "summary.json").unlink()
  assert cli.main(["train", "--resume", str(tmp_path / "b"), "--no-progress",
                   "--json"]) == 0
  resumed = json.loads(capsys.readouterr().out)
  assert resumed["rounds_completed"] == 4
  assert resumed["epsilon"] == whole.summary["epsilon"]
  assert resumed["eval_loss"] == pytest.approx(whole.summary["eval_loss"],
                                               rel=1e-5)
  rows = [json.loads(l) for l in
          (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
  assert [r["round"] for r in rows] == [0, 1, 2, 3]


def test_a_sweep_runs_the_user_model_and_data_and_its_kwargs_grid(data):
  result = sweep.run_sweep(
      _config(rounds=2), {"model_kwargs": [{"hidden": 4}, {"hidden": 8}],
                          "clip_norm": [0.5, 1.0]},
      dataset=data, model=user_code.TinyNet(), tuning=False, **QUIET)
  assert len(result.runs) == 4
  widths = [np.shape(r.params["Dense_0"]["kernel"])[1] for r in result.runs]
  assert sorted(widths) == [4, 4, 8, 8]
  for run in result.runs:
    assert run.config.model == "helpers.user_code:TinyNet"
    assert all(np.isfinite(x).all() for x in _leaves(run.params))


def test_the_cli_takes_model_and_dataset_import_paths(tmp_path, capsys):
  assert cli.main([
      "train", "--model", "helpers.user_code:TinyNet", "--dataset",
      "helpers.user_code:make_dataset", "--set", "model_kwargs.hidden=5",
      "--set", "rounds=2", "--set", "cohort_size=6", "--set", "batch_size=4",
      "--set", "delta=0.001", "--run-dir", str(tmp_path), "--no-progress",
      "--json"]) == 0
  summary = json.loads(capsys.readouterr().out)
  assert summary["rounds_completed"] == 2
  recorded = json.loads((tmp_path / "config.json").read_text())
  assert (recorded["model"], recorded["model_kwargs"]) == (
      "helpers.user_code:TinyNet", {"hidden": 5})
  assert recorded["dataset"] == "helpers.user_code:make_dataset"


def test_a_model_of_a_notebook_is_labelled_and_must_be_passed_again(
    tmp_path, data):

  class Local(nn.Module):  # defined in a function: no import path

    @nn.compact
    def __call__(self, x):
      return nn.Dense(3)(x.reshape((x.shape[0], -1)))

  cfg = _config(rounds=2, checkpoint_every=1)
  runner.run(cfg, dataset=data, model=Local(), run_dir=tmp_path, **QUIET)
  recorded = runner.load_run_config(tmp_path)
  assert (recorded.model, recorded.dataset) == ("<Local>", "<tiny_shifted>")
  with pytest.raises(ValueError, match="'model'.*<Local>.*pass the same"):
    runner.run(recorded.replace(rounds=3), dataset=data, run_dir=tmp_path,
               resume=True, **QUIET)
  with pytest.raises(ValueError, match="'dataset'.*<tiny_shifted>"):
    runner.run(recorded.replace(rounds=3), model=Local(), run_dir=tmp_path,
               resume=True, **QUIET)
  again = runner.run(recorded.replace(rounds=3), dataset=data, model=Local(),
                     run_dir=tmp_path, resume=True, **QUIET)
  assert again.rounds_completed == 3


def test_the_models_loss_and_accuracy_are_the_ones_used(data):
  sim = simulation.build(_config(), data, user_code.TinyNet())
  doubled = sim.model._replace(
      loss=lambda logits, y: 2.0 * losses.cross_entropy(logits, y),
      accuracy=lambda logits, y: np.float32(0.25) + 0.0 * logits[:, 0])
  # One local step: the round's train loss is the initial model's.
  cfg = _config(rounds=1, eval_every=1, batch_size=12)
  plain = runner.run(cfg, dataset=data, model=sim.model, **QUIET)
  custom = runner.run(cfg, dataset=data, model=doubled, **QUIET)
  assert custom.history[0]["train_loss"] == pytest.approx(
      2.0 * plain.history[0]["train_loss"], rel=1e-5)
  assert custom.summary["eval_accuracy"] == pytest.approx(0.25)
  assert custom.summary["eval_loss"] != pytest.approx(
      plain.summary["eval_loss"], rel=1e-3)


def test_a_model_that_computes_a_built_in_one_gets_its_fast_round(data):
  messages = []
  cfg = _config(rounds=3)
  fast = runner.run(cfg, dataset=data, model=user_code.PlainMLP(),
                    progress=False, log=messages.append)
  assert any("factored" in m and "exactly the built-in 'mlp_2nn'" in m
             for m in messages), messages
  plain = runner.run(cfg.replace(round_shape="plain"), dataset=data,
                     model=user_code.PlainMLP(), **QUIET)
  for a, b in zip(_leaves(fast.params), _leaves(plain.params)):
    np.testing.assert_allclose(a, b, atol=2e-6)


@pytest.mark.parametrize("module, loss, kind", [
    (user_code.PlainMLP(widths=(8,)), None, "mlp_2nn"),
    (user_code.PlainMLP(activation="gelu"), None, None),
    (user_code.TinyNet(), None, None),
    # Its own loss: the factored round's softmax cross-entropy is not it.
    (user_code.PlainMLP(), losses.cross_entropy, None),
])
def test_the_round_kind_is_decided_from_the_computation(data, module, loss,
                                                        kind):
  sim = simulation.build(_config(), data, module)
  model = sim.model._replace(loss=loss)
  shape = jax.eval_shape(model.init, jax.random.key(0))
  got = simulation.round_kind(sim.config, model, shape, np.float32)
  assert got == (kind or sim.config.model)


@pytest.mark.parametrize("form", ["class", "pair", "builder"])
def test_every_model_form_builds_the_same_network(form):
  module = user_code.TinyNet(hidden=6)
  x = np.ones((2, user_code.FEATURES), np.float32)
  obj = {
      "class": user_code.TinyNet,
      "pair": (lambda key: module.init(key, x[:1])["params"],
               lambda p, x: module.apply({"params": p}, x)),
      "builder": lambda hidden, num_classes: user_code.TinyNet(
          hidden, num_classes),
  }[form]
  kwargs = {"hidden": 6} if form != "pair" else {}
  model = user_model.to_model(obj, name="m", input_shape=(user_code.FEATURES,),
                              num_classes=3, kwargs=kwargs)
  want = module.init(jax.random.key(1), x[:1])["params"]
  got = model.init(jax.random.key(1))
  for a, b in zip(_leaves(want), _leaves(got)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_allclose(model.apply(got, x),
                             module.apply({"params": want}, x), rtol=1e-6)


def test_what_is_not_a_model_is_a_clear_error():
  with pytest.raises(ValueError, match="'model'.*expected a flax nn.Module"):
    user_model.to_model(42, name="m", input_shape=(3,), num_classes=2)
  with pytest.raises(ValueError, match="'model_kwargs'.*does not build"):
    user_model.to_model(user_code.TinyNet, name="m", input_shape=(3,),
                        num_classes=2, kwargs={"width": 3})


def test_import_paths_name_only_what_imports_back():
  assert import_paths.path_of(user_code.TinyNet) == "helpers.user_code:TinyNet"
  assert import_paths.path_of(lambda: 0) is None

  class Local:
    pass

  assert import_paths.path_of(Local) is None
  with pytest.raises(ValueError, match="'model': cannot import module"):
    import_paths.resolve("no_such_pkg.mod:Net", "model")
  with pytest.raises(ValueError, match="'model'.*no attribute 'Nope'"):
    import_paths.resolve("helpers.user_code:Nope", "model")
  with pytest.raises(ValueError, match="'model'.*import path"):
    config_lib.Config(model="my net")
  # An unimportable builder fails before anything runs, naming the field.
  with pytest.raises(ValueError, match="'dataset': cannot import"):
    simulation.build(config_lib.Config(dataset="nowhere.data:load"))


def test_a_builder_must_return_a_federated_dataset():
  with pytest.raises(ValueError, match="'dataset'.*returned a dict"):
    simulation.load_dataset(config_lib.Config(
        dataset="helpers.user_code:make_dataset.__dict__.copy"))


def test_describe_records_only_what_rebuilds_the_module():
  assert user_model.describe(user_code.TinyNet()) == (
      "helpers.user_code:TinyNet", {})
  assert user_model.describe(user_code.TinyNet(hidden=3)) == (
      "helpers.user_code:TinyNet", {"hidden": 3})
  # An argument that is not a JSON value cannot be recorded.
  assert user_model.describe(user_code.TinyNet(hidden=np.int8(3))) is None


# Data.


def test_from_arrays_makes_one_client_per_key():
  x = np.arange(20, dtype=np.float64).reshape(10, 2)
  y = np.arange(10) % 3
  keys = np.array(["b", "a"] * 5)
  ds = in_memory.from_arrays(x, y, keys, eval_clients={
      "c": {"x": x[:2].astype(np.float32), "y": y[:2].astype(np.int32)}})
  assert ds.train.client_ids == ("a", "b")
  np.testing.assert_array_equal(ds.train.client(0)["x"], x[1::2])
  assert ds.train.features["x"].dtype == np.float32  # JAX's precision
  assert ds.train.features["y"].dtype == np.int32
  assert ds.num_classes == 3 and ds.input_shape == (2,)


@pytest.mark.parametrize("scheme", in_memory.PARTITIONS)
def test_from_centralized_keeps_every_example_once(scheme):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(300, 4)).astype(np.float32)
  y = rng.integers(0, 5, size=300).astype(np.int32)
  ds = in_memory.from_centralized(x, y, num_clients=20,
                                  partition_scheme=scheme, eval_fraction=0.25)
  assert ds.train.num_clients + ds.eval.num_clients == 20
  assert ds.eval.num_clients == 5
  both = np.concatenate([ds.train.features["x"], ds.eval.features["x"]])
  assert both.shape == x.shape
  np.testing.assert_array_equal(np.sort(both[:, 0]), np.sort(x[:, 0]))


@pytest.mark.parametrize("clients, message", [
    ({"a": {"x": np.zeros((2, 3))}}, r"clients\['a'\] must have features"),
    ({"a": {"x": np.zeros((2, 3)), "y": np.zeros(2, int)},
      "b": {"x": np.zeros((2, 4)), "y": np.zeros(2, int)}},
     r"clients\['b'\] feature 'x' has example shape \(4,\)"),
    ({"a": {"x": np.zeros((2, 3)), "y": np.zeros(3, int)}},
     r"clients\['a'\]: features must share"),
    ({"a": {"x": np.zeros((2, 3)), "y": np.zeros(2)},
      "b": {"x": np.zeros((2, 3)), "y": np.zeros(2)}},
     "labels 'y' must be integers"),
    ({"a": {"x": np.zeros((2, 3)), "y": np.array([0, 5])},
      "b": {"x": np.zeros((2, 3)), "y": np.array([0, 1])}},
     r"labels 'y' must lie in \[0, num_classes=3\)"),
    ({}, "non-empty mapping"),
])
def test_malformed_clients_are_named(clients, message):
  with pytest.raises(ValueError, match=message):
    in_memory.from_clients(clients, num_classes=3)


# The README.


def test_the_readme_example_runs(tmp_path, monkeypatch):
  text = README.read_text()
  marker = text.index("<!-- own-model-example")
  code = re.search(r"```python\n(.*?)```", text[marker:], re.S).group(1)
  assert "runner.run(" in code and "in_memory.from_clients" in code
  monkeypatch.chdir(tmp_path)
  namespace = {"__name__": "__main__"}
  exec(compile(code, "README.md", "exec"), namespace)  # pylint: disable=exec-used
  result = namespace["result"]
  assert result.rounds_completed == 20
  # Half the examples are of one class; a trained model does much better.
  assert result.summary["eval_accuracy"] > 0.75
  recorded = json.loads((tmp_path / "runs" / "my-model" / "config.json")
                        .read_text())
  assert (recorded["model"], recorded["dataset"]) == ("<SmallNet>",
                                                      "<my_data>")
