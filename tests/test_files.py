"""Training from federated files read lazily, one cohort per round."""

import numpy as np
import pytest

from fedjax_dp import config as config_lib
from fedjax_dp import runner
from fedjax_dp.data import builtin
from fedjax_dp.data import files
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
                      "x": "pixels", "y": "label", "max_eval_clients": 10},
      model="logistic", rounds=3, cohort_size=8, eval_every=3, delta=1e-3)
  result = runner.run(config, progress=False, log=lambda s: None)
  assert result.rounds_completed == 3
  # One load of the 10 evaluated held-out clients, then one per round of
  # only that round's cohort (never the 320 training clients at once).
  assert loaded[0] == 10
  assert len(loaded) == 4 and max(loaded[1:]) < 40
