"""Training from federated files: loaded once, or read one cohort per
round."""

import jax
import numpy as np
import pytest

from fedjax_dp import config as config_lib
from fedjax_dp import runner
from fedjax_dp.data import builtin
from fedjax_dp.data import files
from fedjax_dp.data import population as population_lib
from fedjax_dp.data.formats import fedjax_sqlite
from fedjax_dp.data.formats import tff_hdf5


def _write(path, clients, seed=0, writer=tff_hdf5.write_tff_hdf5):
  rng = np.random.default_rng(seed)
  ids = [f"c{k:05d}" for k in range(clients)]
  feats = [{"pixels": rng.random((int(rng.integers(1, 6)), 6), dtype=np.float32),
            "label": rng.integers(0, 4, 6)[:0].astype(np.int32)} for _ in ids]
  for f in feats:
    f["label"] = rng.integers(0, 4, f["pixels"].shape[0]).astype(np.int32)
  writer(str(path), ids, feats)
  return ids, feats


def test_file_dataset_maps_features_and_holds_out_clients(tmp_path):
  ids, feats = _write(tmp_path / "d.h5", 30)
  ds = builtin.load("file", path=str(tmp_path / "d.h5"), num_classes=4,
                    x="pixels", y="label", eval_fraction=0.2)
  assert ds.train.num_clients == 24 and ds.eval.num_clients == 6
  assert not set(ds.train.client_ids) & set(ds.eval.client_ids)
  assert ds.input_shape == (6,) and ds.num_classes == 4
  pop = ds.train.subset([0, 3])
  by_id = dict(zip(ids, feats))
  for k, cid in enumerate(pop.client_ids):
    np.testing.assert_array_equal(pop.client(k)["x"], by_id[cid]["pixels"])
    assert pop.client(k)["y"].dtype == np.int32


def test_missing_feature_is_named(tmp_path):
  _write(tmp_path / "d.h5", 5)
  with pytest.raises(ValueError, match="'image'"):
    builtin.load("file", path=str(tmp_path / "d.h5"), num_classes=4,
                 x="image", y="label")
  with pytest.raises(ValueError, match="path"):
    builtin.load("file", num_classes=4)


def test_runner_reads_only_each_cohort(tmp_path, monkeypatch):
  _write(tmp_path / "d.sqlite", 400, writer=fedjax_sqlite.write_fedjax_sqlite)
  loaded = []
  original = files.ClientView.subset

  def counting(self, indices):
    loaded.append(len(indices))
    return original(self, indices)

  monkeypatch.setattr(files.ClientView, "subset", counting)
  config = config_lib.Config(
      name="lazy", dataset="file",
      dataset_kwargs={"path": str(tmp_path / "d.sqlite"), "num_classes": 4,
                      "x": "pixels", "y": "label", "max_eval_clients": 10,
                      "in_memory": False},
      model="logistic", rounds=3, cohort_size=8, eval_every=3, delta=1e-3)
  result = runner.run(config, progress=False, log=lambda s: None)
  assert result.rounds_completed == 3
  # One load of the 10 evaluated held-out clients, then one per round of
  # only that round's cohort (never the 320 training clients at once).
  assert loaded[0] == 10
  assert len(loaded) == 4 and max(loaded[1:]) < 40


def test_a_population_that_fits_is_loaded_once(tmp_path):
  _write(tmp_path / "d.h5", 30)
  kwargs = dict(path=str(tmp_path / "d.h5"), num_classes=4, x="pixels",
                y="label")
  loaded = builtin.load("file", **kwargs)
  assert isinstance(loaded.train, population_lib.FederatedPopulation)
  assert files.decoded_bytes(loaded.train) == (
      int(np.sum(loaded.train.num_examples)) * (6 * 4 + 4))
  # Over the size limit (or asked to), it stays on disk.
  for changes in ({"in_memory_max_gib": 0.0}, {"in_memory": False}):
    lazy = builtin.load("file", **kwargs, **changes)
    assert isinstance(lazy.train, files.ClientView)
    assert lazy.train.client_ids == loaded.train.client_ids
  for bad, field in (({"in_memory": "yes"}, "in_memory"),
                     ({"in_memory_max_gib": -1}, "in_memory_max_gib")):
    with pytest.raises(ValueError, match=field):
      builtin.load("file", **kwargs, **bad)


@pytest.mark.parametrize("audit_canaries", [0, 3])
def test_in_memory_and_per_round_reads_train_alike(tmp_path, audit_canaries):
  """The cohort gathered from the population in memory is the block read
  from the file: the same parameters, bit for bit, and the same ledger."""
  _write(tmp_path / "d.h5", 60)
  results = []
  for in_memory in (True, False):
    config = config_lib.Config(
        name="file", dataset="file",
        dataset_kwargs={"path": str(tmp_path / "d.h5"), "num_classes": 4,
                        "x": "pixels", "y": "label", "in_memory": in_memory},
        model="logistic", rounds=3, cohort_size=8, batch_size=2,
        eval_every=3, delta=1e-3, noise_multiplier=1.0,
        audit_canaries=audit_canaries)
    results.append(runner.run(config, progress=False, log=lambda s: None))
  memory, lazy = results
  for a, b in zip(jax.tree_util.tree_leaves(memory.params),
                  jax.tree_util.tree_leaves(lazy.params)):
    np.testing.assert_array_equal(a, b)
  assert memory.ledger.events == lazy.ledger.events
  assert memory.summary["epsilon"] == lazy.summary["epsilon"]
  assert [m["train_loss"] for m in memory.history] == \
      [m["train_loss"] for m in lazy.history]
