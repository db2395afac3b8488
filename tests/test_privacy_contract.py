"""The privacy contract, over every round variant and every mechanism.

With noise off and worst-case clients (tests/helpers/contract.py: cancelling
gradients, inputs of 1e3..1e30, NaN/Inf/3e38 in an example of the first
client and of a later one, empty clients, garbage in padding):

  * every client's contribution to the release is bounded by what the
    ledger's event assumes (L2 <= C; L1 <= C for Laplace; C + sqrt(d) / s
    for secure aggregation's integers), and removing a client moves the
    release by exactly its own contribution: no client changes another's;
  * what padding holds never matters;

and with noise on:

  * the release carries noise of the std the ledger's event assumes, of
    the right law;
  * releases never share noise: across rounds, trees, sweep lanes, clients
    and devices.

Record-level DP-SGD gets the example-level version: one example moves a
step's release by at most its clip norm.

Every (variant, mechanism) pair is a test; a pair a variant does not run is
listed once, in contract.UNSUPPORTED, and skipped by name (a test checks the
library refuses exactly those). The default selection runs a few pairs (see
DEFAULT); the whole grid is in the slow selection, which CI runs.
"""

import math

import numpy as np
import pytest
from scipy import stats

from fedjax_dp import worst_case
from helpers import contract as ct
from helpers import cpu_devices

IN_PROCESS = [v for v in ct.VARIANTS if v != "sharded"]
# The default selection (the whole grid runs in the slow selection, in CI):
# the plain round under central, local and distributed noise, and the
# factored rounds, whose clip uses a computed bound.
DEFAULT = {("plain", "gaussian"), ("plain", "local"), ("plain", "distributed"),
           ("factored_dense", "gaussian"), ("factored_cnn", "gaussian")}


def _pairs(variants):
  return [pytest.param(v, m, id=f"{v}-{m}",
                       marks=() if (v, m) in DEFAULT else pytest.mark.slow)
          for v in variants for m in ct.MECHANISMS]


def _supported(variant, mechanism):
  reason = ct.UNSUPPORTED.get((variant, mechanism))
  if reason is not None:
    pytest.skip(f"{variant} does not run {mechanism}: {reason}")


def _tolerance(bound, n=1):
  # float32 sums of up to n contributions of size <= bound.
  return 2e-5 * bound * max(n, 1) + 1e-7


# ---------------------------------------------------------------------------
# Support: the library refuses exactly the listed pairs.


@pytest.mark.parametrize("variant", IN_PROCESS)
@pytest.mark.parametrize("mechanism", list(ct.MECHANISMS))
def test_unsupported_pairs_are_refused_by_name(variant, mechanism):
  if (variant, mechanism) in ct.UNSUPPORTED:
    with pytest.raises(ValueError, match="config field|factored|sweep"):
      ct.Case(variant, mechanism)
  else:
    ct.Case(variant, mechanism)


# ---------------------------------------------------------------------------
# Contributions, neighbours and padding (noise off).


def _contributions(case, kind):
  """(full release, [full - release without client i], [release of client
  i alone]) for a cohort of `kind`, in every lane a variant has."""
  clients = ct.cohort(kind)
  n = len(clients)
  state = ct.state_for(case.sim, kind)
  if case.variant == "on_device":
    everyone = ct.device_population_clients(kind)
    state = ct.state_for(case.sim, kind)
    size = len(everyone)
    full = case.device_release(everyone, state=state)
    without = [full - case.device_release(
        everyone, [j != i for j in range(size)], state=state)
               for i in range(n)]
    alone = [case.device_release(everyone, [j == i for j in range(size)],
                                 state=state) for i in range(size)]
    return [(full, without, alone, case.contribution_bound())]
  lanes = []
  if case.variant == "sweep_lanes":
    def releases(valid):
      return case.lane_releases(case.block(clients, valid), state=state)
    bounds = [worst_case.contribution_bound(sim, c.clip_norm)
              for sim, c in zip(case.lane_sims, case.lane_configs)]
  else:
    def releases(valid):
      return [case.release(case.block(clients, valid), state=state)]
    bounds = [case.contribution_bound()]
  full = releases(None)
  without = [releases([j != i for j in range(n)]) for i in range(n)]
  alone = [releases([j == i for j in range(n)]) for i in range(n)]
  for lane, bound in enumerate(bounds):
    lanes.append((full[lane], [full[lane] - w[lane] for w in without],
                  [a[lane] for a in alone], bound))
  return lanes


def _check_contributions(case):
  """Bounded contributions; a neighbour differs by exactly one client's."""
  for kind in ct.KINDS:
    for full, without, alone, (p, bound) in _contributions(case, kind):
      n = len(alone)
      assert np.all(np.isfinite(full)), kind
      for i, contribution in enumerate(without):
        # Adding or removing client i moves the release by at most the
        # sensitivity the ledger assumes...
        assert ct.norm(contribution, p) <= bound + _tolerance(bound), (
            kind, i, ct.norm(contribution, p), bound)
        # ...and by exactly what client i adds on its own.
        np.testing.assert_allclose(contribution, alone[i], rtol=0,
                                   atol=_tolerance(bound, n),
                                   err_msg=f"{kind}: client {i}")
      np.testing.assert_allclose(sum(alone), full, rtol=0,
                                 atol=_tolerance(bound, n), err_msg=kind)


def _check_padding(case):
  """What padding holds never changes the release."""
  clients = ct.cohort("ordinary")
  if case.variant == "sweep_lanes":
    release = lambda block: np.concatenate(case.lane_releases(block))
  else:
    release = case.release
  clean = release(case.block(clients))
  for fill in (np.nan, np.inf, 1e30):
    np.testing.assert_array_equal(
        release(case.block(clients, padding_fill=fill)), clean)


# ---------------------------------------------------------------------------
# Noise (on): the event's std and law, and no noise shared.

Z = 1.0


def _noise_release(case, round_index=0, valid=None):
  """Releases of a cohort of six empty clients (no signal: pure noise)."""
  clients = [ct.client_data("empty", np.random.default_rng(0))] * 6
  if case.variant == "on_device":
    return [case.device_release(ct.ordinary_population(), [False] * ct.POPULATION,
                                round_index=round_index)]
  block = case.block(clients, valid)
  if case.variant == "sweep_lanes":
    return case.lane_releases(block, round_index=round_index)
  return [case.release(block, round_index=round_index)]


def _expected_stddev(case, clip_norm, sim=None):
  """Per-coordinate std of the release the ledger's event implies, for the
  six (or, on the device, all) participants of `_noise_release` (`sim`: a
  sweep lane's own)."""
  participants = ct.POPULATION if case.variant == "on_device" else 6
  if case.config.mechanism == "tree":
    participants = min(participants, case.sim.plan.sampler.cohort_size)
  return worst_case.release_noise_stddev(sim or case.sim, participants,
                                         clip_norm)


def _check_noise_law(case):
  """The noise's std and law are those the ledger's event assumes."""
  clips = ([c.clip_norm for c in case.lane_configs]
           if case.variant == "sweep_lanes" else [case.config.clip_norm])
  sims = (case.lane_sims if case.variant == "sweep_lanes" else [case.sim])
  for release, clip, sim in zip(_noise_release(case), clips, sims):
    d = release.size
    std = _expected_stddev(case, clip, sim)
    laplace = case.config.mechanism == "laplace"
    # The sample std's relative error is ~ sqrt((kurtosis - 1) / (4 d)):
    # 1 / sqrt(2 d) for a Gaussian, sqrt(5 / (4 d)) for a Laplace; 6 of
    # those (and discrete Gaussian shares are Gaussian to 1e-3 here).
    rel = 6 * math.sqrt((5.0 if laplace else 2.0) / (4 * d)) + (
        1e-3 if case.sim.plan.secagg is not None else 0.0)
    assert np.std(release) == pytest.approx(std, rel=rel)
    law = "laplace" if laplace else "norm"
    scale = std / math.sqrt(2) if laplace else std
    assert stats.kstest(release / scale, law).pvalue > 1e-5


def _max_correlation(d):
  # |corr| of two independent d-vectors is ~ N(0, 1/d): 6 sigma.
  return 6.0 / math.sqrt(d)


def _check_no_shared_noise(case):
  """No two releases share noise."""
  variant = case.variant
  # Across rounds; for DP-FTRL across trees (a tree's releases are
  # correlated by construction, and accounted as one event): the first
  # release of tree 0 and of tree 1.
  later = (case.config.tree_restart_every
           if case.config.mechanism == "tree" else 1)
  first = _noise_release(case, 0)
  second = _noise_release(case, later)
  if later == 1:
    second = [ct.fresh_draw(case.sim.plan, a, b)
              for a, b in zip(first, second)]
  for a, b in zip(first, second):
    assert abs(np.corrcoef(a, b)[0, 1]) < _max_correlation(a.size)
  if variant == "sweep_lanes":
    # Two configurations of one seed.
    a, b = first
    assert abs(np.corrcoef(a, b)[0, 1]) < _max_correlation(a.size)
  if case.config.noise_placement != "central" and variant != "on_device":
    # Clients: each participant's noise is its own (the sum's variance is
    # checked by the std test, on the device too, where every client of the
    # population takes part); here, one participant alone at two slots.
    one = _noise_release(case, 0, valid=[True] + [False] * 5)[0]
    other = _noise_release(case, 0, valid=[False] * 5 + [True])[0]
    assert abs(np.corrcoef(one, other)[0, 1]) < _max_correlation(one.size)


# ---------------------------------------------------------------------------
# Every pair: all of the above (one test per pair, so that each pair's
# compiled rounds are freed before the next pair's).


@pytest.mark.parametrize("variant,mechanism", _pairs(IN_PROCESS))
def test_contract(variant, mechanism):
  _supported(variant, mechanism)
  case = ct.Case(variant, mechanism)
  _check_contributions(case)
  if variant != "on_device":  # its block is built on the device
    _check_padding(case)
  del case
  noisy = ct.Case(variant, mechanism, noise_multiplier=Z)
  _check_noise_law(noisy)
  _check_no_shared_noise(noisy)


# ---------------------------------------------------------------------------
# Record-level DP-SGD: one example's contribution to a step.


@pytest.mark.slow
@pytest.mark.parametrize("variant", [
    "plain", "vmapped_chunks", "independent_chunks"])
def test_one_example_moves_a_dp_sgd_step_by_at_most_its_clip(variant):
  case = ct.Case(variant, "dp_sgd", clip_norm=float("inf"))
  example_clip = case.config.example_clip_norm
  # One local step: the client's delta is -lr (sum of clipped example
  # gradients) / B; one example (replaced by padding) moves it by at most
  # lr C_ex / B.
  bound = case.config.client_lr * example_clip / ct.BATCH
  for kind in ct.KINDS:
    if kind == "empty":
      continue
    client = ct.client_data(kind, np.random.default_rng(3))
    state = ct.state_for(case.sim, kind)
    full = case.release(case.block([client]), state=state)
    assert np.all(np.isfinite(full)), kind
    for j in range(client["x"].shape[0]):
      keep = np.arange(client["x"].shape[0]) != j
      fewer = {k: v[keep] for k, v in client.items()}
      moved = full - case.release(case.block([fewer]), state=state)
      assert ct.norm(moved, 2) <= bound * (1 + 1e-5) + 1e-7, (kind, j)


# ---------------------------------------------------------------------------
# Sharded over simulated CPU devices (a subprocess with 4 devices).


@pytest.mark.slow
@pytest.mark.parametrize("mechanism", list(ct.MECHANISMS))
def test_sharded_round_keeps_the_contract(mechanism):
  _supported("sharded", mechanism)
  result = cpu_devices.run_json("contract_sharded.py", 4, mechanism)
  assert result["devices"] == 4
  assert result["violations"] == [], result["violations"]
  assert result["checked"] > 0
