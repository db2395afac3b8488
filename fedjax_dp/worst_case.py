"""Worst-case clients and what a round's guarantee promises about them.

The pieces the privacy contract suite (tests/test_privacy_contract.py) and
the black-box probe (scripts/privacy_probe.py) build their checks from, and
that a user can point at a model and data of their own:

  * `MECHANISMS`: the config changes that select each privacy mechanism;
  * `client(kind, ...)`: a client whose data stresses clipping and masking:
    gradients that nearly cancel, inputs of 1e3..1e30, NaN, Inf or 3e38 in
    one example, no examples at all;
  * `dataset(clients, ...)`: an in-memory federated dataset of them, for
    `simulation.build(config, dataset)` or `runner.run(..., dataset=...)`;
  * `state_for(sim, kind)`: the server state that makes `cancelling` clients
    cancel (near-uniform predictions);
  * `contribution_bound(sim)`: the norm of one client's contribution to a
    round's release that the ledger's event assumes;
  * `event_noise_stddev(...)`: the per-coordinate noise std a DP event
    assumes for one release.

Nothing here is used by a run.
"""

import math

import dp_accounting
import jax
import numpy as np

from fedjax_dp import server as server_lib
from fedjax_dp import simulation
from fedjax_dp.data import dataset as dataset_lib
from fedjax_dp.data import population as population_lib
from fedjax_dp.privacy import clipping
from fedjax_dp.privacy import correlated_noise
from fedjax_dp.privacy import plan as plan_lib
from fedjax_dp.privacy import tree_aggregation

# Worst-case client kinds (see `client`).
KINDS = ("ordinary", "cancelling", "cancelling_deep", "large", "huge", "nan",
         "inf", "max_float", "empty")
# Cancelling clients: (input magnitude, scale of the model's last layer in
# `state_for`). Each pair makes a float32 Gram-matrix norm of one model's
# update cancel to about 0 while the true update is several clip norms
# (measured: the CNN and logistic regression at the first, the 2NN at the
# second).
CANCELLING = {"cancelling": (1e6, 1e-9), "cancelling_deep": (1e7, 1e-11)}


# Config changes that select each privacy mechanism (on top of a central
# Gaussian base), as the contract suite and the probe run them.
MECHANISMS = {
    "gaussian": {},
    "laplace": dict(mechanism="laplace"),
    "adaptive": dict(adaptive_clipping=True, clip_count_stddev=2.0),
    "per_layer": dict(per_layer_clipping="uniform"),
    "local": dict(noise_placement="local"),
    "distributed": dict(noise_placement="distributed", min_participants=1),
    "secagg": dict(noise_placement="distributed", secagg_bits=32,
                   accountant="rdp", min_participants=1),
    "dp_ftrl": dict(mechanism="tree", sampling="disjoint", accountant="rdp",
                    sampling_probability=None, cohort_size=6,
                    tree_restart_every=2),
    "dp_sgd": dict(example_clip_norm=1.0, example_noise_multiplier=0.0),
    # Matrix-factorization noise under a (k, b) = (2, 2) schema: cohorts of
    # 6 from 2 groups, so each client is in at most 2 of 4 rounds.
    "band_mf": dict(mechanism="band_mf", sampling="cyclic", min_separation=2,
                    sampling_probability=None, cohort_size=6, mf_bands=2),
    "blt": dict(mechanism="blt", sampling="cyclic", min_separation=2,
                sampling_probability=None, cohort_size=6, blt_buffers=2),
}


def client(kind: str, rng: np.random.Generator, size: int,
           input_shape: tuple[int, ...], num_classes: int) -> dict:
  """One client's examples {"x": [n, *input_shape], "y": [n]} of a kind.

  "ordinary": Gaussian features; "cancelling" / "cancelling_deep": one
  input of a large norm once with every label (at near-uniform predictions
  the per-example gradients almost cancel; `num_classes` examples);
  "large": features times 1e3 (one example 1e6); "huge": one example of
  1e30; "nan", "inf", "max_float": NaN, Inf or 3e38 in one feature of one
  example; "empty": no examples.
  """
  x = rng.normal(size=(size,) + tuple(input_shape)).astype(np.float32)
  y = rng.integers(0, num_classes, size).astype(np.int32)
  first = (0,) * len(input_shape)
  if kind == "ordinary":
    pass
  elif kind in CANCELLING:
    v = rng.normal(size=input_shape).astype(np.float32)
    magnitude = np.float32(CANCELLING[kind][0])
    x = np.repeat((magnitude * v / np.linalg.norm(v))[None], num_classes,
                  axis=0)
    y = np.arange(num_classes, dtype=np.int32)
  elif kind == "large":
    x *= np.float32(1e3)
    x[0] *= np.float32(1e3)
  elif kind == "huge":
    x[0] = np.float32(1e30)
  elif kind == "nan":
    x[(0,) + first] = np.nan
  elif kind == "inf":
    x[(size - 1,) + first] = np.inf
  elif kind == "max_float":
    x[(min(1, size - 1),) + first] = np.float32(3e38)
  elif kind == "empty":
    x, y = x[:0], y[:0]
  else:
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
  return {"x": x, "y": y}


def dataset(clients: list[dict], input_shape: tuple[int, ...],
            num_classes: int, name: str = "worst_case"
            ) -> dataset_lib.FederatedDataset:
  """An in-memory federated dataset of these training clients (one
  ordinary held-out client)."""
  train = population_lib.FederatedPopulation.from_client_arrays(
      [f"c{i}" for i in range(len(clients))], clients)
  held = population_lib.FederatedPopulation.from_client_arrays(
      ["held"], [client("ordinary", np.random.default_rng(123), 4,
                        input_shape, num_classes)])
  return dataset_lib.FederatedDataset(name, train, held, input_shape, num_classes)


def at_round(plan: plan_lib.PrivacyPlan, state, round_index: int):
  """`state` with the correlated noise as it stands before round
  `round_index`, from the state of round 0, to test a round on its own:
  DP-FTRL's tree in closed form (`tree_aggregation.state_before_round`), a
  matrix factorization's buffers stepped `round_index` times (they hold
  sigma = 1 noise). Other mechanisms' state is the same in every round such
  tests run."""
  privacy = state.privacy
  if privacy is None or privacy.correlated is None:
    return state
  if isinstance(plan.strategy, tree_aggregation.TreeNoise):
    moved = tree_aggregation.state_before_round(
        privacy.correlated.key, round_index, plan.restart_every)
  else:
    moved = privacy.correlated
    for _ in range(round_index):
      _, moved = plan.strategy.noise(moved, state.params, 1.0)
  return state._replace(privacy=privacy._replace(correlated=moved))


def state_for(sim: simulation.Simulation, kind: str, seed: int = 0):
  """The server state to test a `kind` client from: the initial one, and for
  cancelling kinds with the last dense layer scaled down, so that
  predictions are uniform up to scale * |features|."""
  state = sim.initial_state(seed)
  if kind not in CANCELLING:
    return state
  scale = np.float32(CANCELLING[kind][1])
  params = dict(jax.tree_util.tree_map(np.asarray, state.params))
  last = max((n for n in params if n.startswith("Dense_")),
             key=lambda n: int(n.split("_")[1]))
  params[last] = {k: (v * scale).astype(v.dtype)
                  for k, v in params[last].items()}
  return server_lib.init(params, sim.server_optimizer, state.privacy)


def contribution_bound(sim: simulation.Simulation,
                       clip_norm: float | None = None) -> tuple[int, float]:
  """(p, bound): one client's contribution to a round's release has L_p
  norm at most `bound` under the ledger's event: C in L2; C in L1 for
  Laplace; C + sqrt(d) / s for secure aggregation's integers."""
  clip_norm = sim.config.clip_norm if clip_norm is None else clip_norm
  if sim.plan.noise is plan_lib.Noise.LAPLACE:
    return 1, clip_norm
  if sim.plan.secagg is not None:
    secagg = sim.plan.secagg
    return 2, clip_norm + math.sqrt(secagg.dim) / secagg.scale
  return 2, clip_norm


def event_noise_stddev(event, relation: clipping.NeighbouringRelation,
                       clip_norm: float,
                       count_stddev: float | None = None) -> float:
  """Per-coordinate noise std of one release that `event` accounts for.

  The event's noise multiplier is std / sensitivity, with the sensitivity
  of its relation (`clipping.sensitivity`); Laplace's b = z C has std
  sqrt(2) b; a tree event's nodes have std z C. Adaptive clipping
  (`count_stddev` given): a composed event's first Gaussian is the
  update's; a single Gaussian is the pair's equivalent z, of which the
  update has z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2) (add/remove units).
  Distributed and local noise: per participant (multiply by the square
  root of the participants, over n_min for distributed shares).
  """
  sensitivity = clipping.sensitivity(clip_norm, relation)
  if isinstance(event, dp_accounting.TruncatedSubsampledGaussianDpEvent):
    event = dp_accounting.GaussianDpEvent(event.noise_multiplier)
  if isinstance(event, (dp_accounting.PoissonSampledDpEvent,
                        dp_accounting.SampledWithoutReplacementDpEvent)):
    event = event.event
  if isinstance(event, dp_accounting.ComposedDpEvent):
    event = event.events[0]
  elif count_stddev is not None and isinstance(
      event, dp_accounting.GaussianDpEvent):
    event = dp_accounting.GaussianDpEvent(
        (event.noise_multiplier ** -2 - (2.0 * count_stddev) ** -2) ** -0.5)
  if isinstance(event, dp_accounting.GaussianDpEvent):
    return event.noise_multiplier * sensitivity
  if isinstance(event, dp_accounting.LaplaceDpEvent):
    return math.sqrt(2.0) * event.noise_multiplier * sensitivity
  if isinstance(event, dp_accounting.SingleEpochTreeAggregationDpEvent):
    return event.noise_multiplier * clip_norm
  raise ValueError(
      f"event_noise_stddev takes Gaussian, Laplace and tree-aggregation "
      f"events (sampled, truncated or composed); got {event!r}")


def release_noise_stddev(sim: simulation.Simulation, participants: int,
                         clip_norm: float | None = None) -> float:
  """The noise std of one coordinate of a round's release with this many
  participants, as the ledger's event for `sim` assumes it (round 0's,
  under a participation schema)."""
  clip_norm = sim.config.clip_norm if clip_norm is None else clip_norm
  if sim.plan.secagg is not None:
    # Discrete Gaussian shares of std sigma_c (integer units) per
    # participant.
    return math.sqrt(participants) * sim.plan.secagg.share_stddev / (
        sim.plan.secagg.scale)
  if sim.plan.schema:
    # The event covers the whole run (or a cycle); round 0's release carries
    # z C times the first entry of C^{-1} (1 for the tree and plain noise).
    first = 1.0
    if isinstance(sim.plan.strategy, (correlated_noise.BandedToeplitz,
                                      correlated_noise.BufferedInverse)):
      first = abs(float(sim.plan.strategy.noise_coefs(1)[0]))
    return sim.plan.noise_multiplier * clip_norm * first
  count = sim.plan.count_stddev if sim.config.adaptive_clipping else None
  std = event_noise_stddev(sim.plan.event(), sim.plan.relation, clip_norm,
                           count)
  if sim.plan.placement is plan_lib.Placement.LOCAL:
    return std * math.sqrt(participants)
  if sim.plan.placement is plan_lib.Placement.DISTRIBUTED:
    return std * math.sqrt(participants / sim.plan.min_participants)
  return std
