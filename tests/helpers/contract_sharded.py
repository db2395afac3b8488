"""Run by test_privacy_contract.py with 4 CPU devices: the contract of the
round sharded over them, for one mechanism (argv[1]).

Prints one JSON line: the devices, how many checks ran, and every violation
(empty when the contract holds).
"""

import json
import math
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent.parent))

import jax  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from fedjax_dp import worst_case  # pylint: disable=g-import-not-at-top
from helpers import contract as ct  # pylint: disable=g-import-not-at-top


def main():
  mechanism = sys.argv[1]
  violations, checked = [], 0
  case = ct.Case("sharded", mechanism)
  assert case.sim.mesh is not None and case.sim.mesh.size == 4
  p, bound = case.contribution_bound()
  tol = lambda n: 2e-5 * bound * n + 1e-7
  for kind in ct.KINDS:
    clients = ct.cohort(kind)
    n = len(clients)
    state = ct.state_for(case.sim, kind)
    full = case.release(case.block(clients), state=state)
    checked += 1
    if not np.all(np.isfinite(full)):
      violations.append(f"{kind}: release not finite")
      continue
    alone = []
    for i in range(n):
      without = case.release(case.block(clients, [j != i for j in range(n)]),
                             state=state)
      only = case.release(case.block(clients, [j == i for j in range(n)]),
                          state=state)
      alone.append(only)
      moved = full - without
      checked += 2
      if ct.norm(moved, p) > bound + tol(1):
        violations.append(f"{kind}: client {i} moves the release by "
                          f"{ct.norm(moved, p):.6g} > {bound:.6g}")
      if np.max(np.abs(moved - only)) > tol(n):
        violations.append(f"{kind}: client {i}'s contribution depends on "
                          "the others")
    checked += 1
    if np.max(np.abs(sum(alone) - full)) > tol(n):
      violations.append(f"{kind}: the release is not the sum of the "
                        "clients' contributions")
  clean = case.release(case.block(ct.cohort("ordinary")))
  for fill in (np.nan, 1e30):
    checked += 1
    if not np.array_equal(
        case.release(case.block(ct.cohort("ordinary"), padding_fill=fill)),
        clean):
      violations.append(f"padding holding {fill} changed the release")
  # Noise across devices: each slot's (or the central) noise is its own.
  noisy = ct.Case("sharded", mechanism, noise_multiplier=1.0)
  empty = [ct.client_data("empty", np.random.default_rng(0))] * 6
  release = noisy.release(noisy.block(empty))
  std = worst_case.release_noise_stddev(noisy.sim, 6)
  rel = 6 * math.sqrt((5.0 if noisy.config.mechanism == "laplace" else 2.0)
                      / (4 * release.size)) + 1e-3
  checked += 1
  if abs(np.std(release) / std - 1) > rel:
    violations.append(f"noise std {np.std(release):.6g}, the event "
                      f"assumes {std:.6g}")
  later = (noisy.config.tree_restart_every
           if noisy.config.mechanism == "tree" else 1)
  again = noisy.release(noisy.block(empty), round_index=later)
  if later == 1:
    again = ct.fresh_draw(noisy.sim.plan, release, again)
  checked += 1
  if abs(np.corrcoef(release, again)[0, 1]) > 6 / math.sqrt(release.size):
    violations.append("two rounds share noise")
  print(json.dumps({"devices": jax.device_count(), "checked": checked,
                    "violations": violations}))


if __name__ == "__main__":
  main()
