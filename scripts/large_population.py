"""Trains on a StackOverflow-sized population stored on disk; reports memory.

Writes (once) a FedJAX-SQLite file of 342,000 synthetic clients (default:
1 to 30 examples each of 128 float32 features, ~2.6 GB on disk), then runs a
few DP-FedAvg rounds reading only each round's cohort, and prints the
population's size on disk against the process's peak resident memory.

  python scripts/large_population.py --dir /tmp/fedjax_dp_large --rounds 5
"""

import argparse
import json
import os
import pathlib
import resource
import sqlite3
import time

import numpy as np

from fedjax_dp import config as config_lib
from fedjax_dp import runner
from fedjax_dp.data.formats import fedjax_sqlite


def write_population(path: pathlib.Path, clients: int, dim: int, seed: int):
  """Streams clients into a FedJAX SQLite file without holding them all."""
  rng = np.random.default_rng(seed)
  tmp = path.with_suffix(".partial")
  tmp.unlink(missing_ok=True)
  db = sqlite3.connect(tmp)
  db.execute("CREATE TABLE federated_data (client_id BLOB NOT NULL PRIMARY "
             "KEY, data BLOB NOT NULL, num_examples INTEGER NOT NULL)")
  w = rng.normal(size=(dim, 10)).astype(np.float32)
  rows = []
  for k in range(clients):
    n = int(rng.integers(1, 31))
    x = rng.normal(size=(n, dim)).astype(np.float32)
    y = np.argmax(x @ w, axis=1).astype(np.int32)
    blob = fedjax_sqlite.serialize({"x": x, "y": y})
    rows.append((f"client{k:06d}".encode(), blob, n))
    if len(rows) == 5000:
      db.executemany("INSERT INTO federated_data VALUES (?, ?, ?)", rows)
      rows = []
  db.executemany("INSERT INTO federated_data VALUES (?, ?, ?)", rows)
  db.commit()
  db.close()
  os.replace(tmp, path)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--dir", default="/tmp/fedjax_dp_large")
  parser.add_argument("--clients", type=int, default=342_000)
  parser.add_argument("--dim", type=int, default=128)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--cohort", type=int, default=1000)
  args = parser.parse_args()
  folder = pathlib.Path(args.dir)
  folder.mkdir(parents=True, exist_ok=True)
  path = folder / f"population_{args.clients}_{args.dim}.sqlite"
  if not path.exists():
    t = time.perf_counter()
    write_population(path, args.clients, args.dim, seed=0)
    print(f"wrote {path} in {time.perf_counter() - t:.0f} s")
  size = path.stat().st_size
  config = config_lib.Config(
      name="large_population", dataset="file",
      # Streamed, as a population larger than memory would be (this one
      # would fit on a large machine).
      dataset_kwargs={"path": str(path), "num_classes": 10,
                      "max_eval_clients": 200, "in_memory": False},
      model="logistic", rounds=args.rounds, cohort_size=args.cohort,
      batch_size=10, local_epochs=1, eval_every=args.rounds, delta=1e-6)
  t = time.perf_counter()
  result = runner.run(config, progress=False)
  elapsed = time.perf_counter() - t
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  print(json.dumps({
      "clients": args.clients, "population_bytes_on_disk": size,
      "peak_rss_bytes": peak, "ratio_peak_to_population": peak / size,
      "rounds": result.rounds_completed, "seconds": elapsed,
      "epsilon": result.summary["epsilon"],
      "eval_accuracy": result.summary.get("eval_accuracy")}))


if __name__ == "__main__":
  main()
