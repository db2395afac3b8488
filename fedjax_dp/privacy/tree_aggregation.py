"""Tree-aggregation noise for DP-FTRL (Kairouz et al. 2021).

"Practical and Private (Deep) Learning without Sampling or Shuffling"
(ICML 2021). The server releases noisy prefix sums of the clipped per-round
sums g_1, g_2, ...: after step t of a tree,

    S~_t = sum_{s <= t} g_s + N_t,   N_t = sum of the node noises of the
                                     dyadic decomposition of [1, t],

a binary tree over the steps whose node (level l, index k) covers steps
[k 2^l + 1, (k + 1) 2^l] and holds noise n_{l,k} ~ N(0, sigma^2 I). [1, t]
is covered by one node per set bit of t (bit l set: node (l, (t >> l) - 1)),
so N_t has std sigma * sqrt(popcount(t)) and O(log t) terms.

No noise is stored: node (l, k) of tree j draws its noise from
fold_in(fold_in(fold_in(key, j), l), k), so any N_t can be recomputed. The
round consumes the increment N_t - N_{t-1} (`update`): adding it to g_t makes
the running sum of what the server applies equal to S~_t, so a model that
accumulates increments (e.g. the SGD server step, or FTRL's
theta_t = theta_0 - eta S~_t) is a post-processing of the released prefix
sums, whatever the server optimizer. With t = (t - 1) + 1 and k the lowest
set bit of t, the increment is +n_{k, (t >> k) - 1} minus the nodes of levels
< k of t - 1: higher nodes cancel exactly, by construction.

Restarts: after `restart_every` steps a new tree (fresh keys, N reset to 0)
starts; the old tree's last noise stays in the model, which then acts as the
new tree's starting point (Kairouz et al. 2021, Section 4 / Appendix D).

Privacy: neighbouring relation REPLACE_SPECIAL (dp_accounting's name;
Kairouz et al. 2021, Definition 1.1): one client's data replaced by the
special zero record, so in every step in which it took part its clipped
update (L2 norm <= C) becomes 0, moving that step's sum by at most C. No
sampling is used and none is credited: which clients take part in a step
may be arbitrary (data-independent), but each client must take part at most
once per tree (`participation="once_per_tree"`: the trees compose) or at most
once across all trees (`participation="once"`: dp_accounting's
SingleEpochTreeAggregationDpEvent with the list of tree sizes, which is
not composed across trees). A client in a step changes the nodes above that
step, at most ceil(log2(T + 1)) of them for a tree of T steps, each by <= C,
with node noise sigma = z C: a Gaussian mechanism with L2 sensitivity
sqrt(depth) C, which is dp_accounting's RDP for the event
SingleEpochTreeAggregationDpEvent(z, T) (alpha depth / (2 z^2)). Only the
RDP accountant takes it, and only under REPLACE_SPECIAL.
`sampling.DisjointSampler` draws cohorts that satisfy the participation
constraint.

Several participations in one tree (no restarts), each client in at most k
steps at least b apart (Gboard's schema): `max_sensitivity_squared` gives
the largest sum of squared node counts one client can cause, s, exactly;
the tree is then a Gaussian mechanism of noise multiplier z / sqrt(s)
(rho = s / (2 z^2) zCDP), under REPLACE_SPECIAL
(`multi_participation_event`).
"""

import dataclasses
import functools
import math
from typing import NamedTuple

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np

from fedjax_dp import types

PARTICIPATIONS = ("once_per_tree", "once")
RELATION = dp_accounting.NeighboringRelation.REPLACE_SPECIAL


class TreeState(NamedTuple):
  key: types.PRNGKey  # Root of every node's key.
  step: jax.Array  # int32: steps done in the current tree (0..restart_every).
  tree_index: jax.Array  # int32: index of the current tree.


def init(key: types.PRNGKey) -> TreeState:
  return TreeState(key, jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))


def num_levels(restart_every: int) -> int:
  """Levels needed for steps 1..restart_every: bits of restart_every."""
  if restart_every < 1:
    raise ValueError(f"restart_every must be >= 1, got {restart_every!r}")
  return int(restart_every).bit_length()


def _node_noise(key, tree_index, level, index, template, stddev):
  k = jax.random.fold_in(jax.random.fold_in(
      jax.random.fold_in(key, tree_index), level), index)
  leaves, treedef = jax.tree_util.tree_flatten(template)
  keys = jax.random.split(k, len(leaves))
  return [stddev * jax.random.normal(kk, x.shape, jnp.float32)
          for x, kk in zip(leaves, keys)], treedef


def cumulative_noise(key: types.PRNGKey, tree_index: jax.Array, t: jax.Array,
                     template: types.PyTree, stddev: jax.Array,
                     levels: int) -> types.PyTree:
  """N_t of tree `tree_index`: the noise in its released prefix sum at step t.

  Args:
    key: the state's root key.
    tree_index: int32 scalar.
    t: int32 scalar in [0, 2^levels); 0 gives zeros.
    template: tree with the shapes of the sum (values unused).
    stddev: per-node std sigma = z * C.
    levels: static number of tree levels (`num_levels(restart_every)`).

  Returns:
    float32 tree of std sigma * sqrt(popcount(t)).
  """
  t = jnp.asarray(t, jnp.int32)
  total = [jnp.zeros(x.shape, jnp.float32)
           for x in jax.tree_util.tree_leaves(template)]
  treedef = jax.tree_util.tree_structure(template)
  for level in range(levels):
    has = ((t >> level) & 1) == 1
    noise, treedef = _node_noise(key, tree_index, level, (t >> level) - 1,
                                 template, stddev)
    total = [a + jnp.where(has, n, 0.0) for a, n in zip(total, noise)]
  return jax.tree_util.tree_unflatten(treedef, total)


def increment_noise(key: types.PRNGKey, tree_index: jax.Array, t: jax.Array,
                    template: types.PyTree, stddev: jax.Array,
                    levels: int) -> types.PyTree:
  """N_t - N_{t-1} for t >= 1, node by node (shared nodes never drawn)."""
  t = jnp.asarray(t, jnp.int32)
  prev = t - 1
  lowest = jnp.zeros((), jnp.int32)
  # Lowest set bit k of t (t >= 1).
  for level in reversed(range(levels)):
    lowest = jnp.where(((t >> level) & 1) == 1, level, lowest)
  total = [jnp.zeros(x.shape, jnp.float32)
           for x in jax.tree_util.tree_leaves(template)]
  treedef = jax.tree_util.tree_structure(template)
  for level in range(levels):
    add = level == lowest  # node (k, (t >> k) - 1) enters
    sub = level < lowest  # nodes of t - 1 below k leave
    index = jnp.where(add, (t >> level) - 1, (prev >> level) - 1)
    sign = jnp.where(add, 1.0, jnp.where(sub, -1.0, 0.0))
    noise, treedef = _node_noise(key, tree_index, level, index, template,
                                 stddev)
    total = [a + sign * n for a, n in zip(total, noise)]
  return jax.tree_util.tree_unflatten(treedef, total)


def state_before_round(key: types.PRNGKey, round_index: int,
                       restart_every: int) -> TreeState:
  """The state `update` leaves after r rounds of a run (0-based round r
  starts from it), in closed form: after r >= 1 rounds, tree
  (r - 1) // R holds (r - 1) % R + 1 steps. Runs carry the state from round
  to round; this gives it for any round directly (tests, probes).
  """
  r, big_r = int(round_index), int(restart_every)
  if r == 0:
    return init(key)
  return TreeState(key, jnp.asarray((r - 1) % big_r + 1, jnp.int32),
                   jnp.asarray((r - 1) // big_r, jnp.int32))


class TreeOutput(NamedTuple):
  step: jax.Array  # t, the step within the current tree (1-based).
  tree_index: jax.Array
  restarted: jax.Array  # bool: this step started a new tree.


def update(state: TreeState, clipped_sum: types.PyTree, stddev: jax.Array,
           restart_every: jax.Array, *, levels: int
           ) -> tuple[types.PyTree, TreeState, TreeOutput]:
  """Adds this step's tree-noise increment to the clipped sum.

  Args:
    state: the tree state.
    clipped_sum: sum of this round's clipped updates (before noise).
    stddev: per-node noise std sigma = z * C (float32 scalar).
    restart_every: int32 steps per tree (array; must be < 2^levels).
    levels: static, `num_levels(max restart_every)`.

  Returns:
    (clipped_sum + N_t - N_{t-1}, new state, step info).

  Privacy: see the module docstring; the ledger needs `round_event` for
    every round.
  """
  inc, moved, out = _step(state, clipped_sum, stddev, restart_every, levels)
  noisy = jax.tree_util.tree_map(
      lambda x, n: (x.astype(jnp.float32) + n).astype(x.dtype),
      clipped_sum, inc)
  return noisy, moved, out


def _step(state: TreeState, template: types.PyTree, stddev: jax.Array,
          restart_every, levels: int):
  """(N_t - N_{t-1}, the state after step t, step info)."""
  restart = state.step >= jnp.asarray(restart_every, jnp.int32)
  tree_index = state.tree_index + restart.astype(jnp.int32)
  t = jnp.where(restart, 0, state.step) + 1
  inc = increment_noise(state.key, tree_index, t, template, stddev, levels)
  return (inc, TreeState(state.key, t, tree_index),
          TreeOutput(t, tree_index, restart))


@dataclasses.dataclass(frozen=True)
class TreeNoise:
  """The tree as one of the round's correlated-noise strategies (beside
  `correlated_noise`'s matrix factorizations): the same init/noise pair."""

  restart_every: int

  def init(self, key: types.PRNGKey, template: types.PyTree) -> TreeState:
    del template  # Node noises are drawn when needed; nothing is buffered.
    return init(key)

  def noise(self, state: TreeState, template: types.PyTree,
            stddev: jax.Array) -> tuple[types.PyTree, TreeState]:
    """(this step's noise increment, the state after it)."""
    inc, moved, _ = _step(state, template, stddev, self.restart_every,
                          num_levels(self.restart_every))
    return inc, moved

  @staticmethod
  def metrics(state: TreeState) -> dict:
    return {"tree_index": state.tree_index, "tree_step": state.step}


def tree_sizes(num_rounds: int, restart_every: int) -> list[int]:
  """Steps in each tree of a run: [R, R, ..., remainder]."""
  full, rest = divmod(int(num_rounds), int(restart_every))
  return [int(restart_every)] * full + ([rest] if rest else [])


def dp_event(noise_multiplier: float, num_rounds: int, restart_every: int,
             participation: str = "once_per_tree") -> dp_accounting.DpEvent:
  """The whole run's event, under REPLACE_SPECIAL (RDP accountant).

  Args:
    noise_multiplier: z = sigma / C (per node).
    num_rounds: steps in the run.
    restart_every: steps per tree.
    participation: "once_per_tree" (each client at most once in each tree:
      the trees compose) or "once" (at most once in the whole run).
  """
  if participation not in PARTICIPATIONS:
    raise ValueError(
        f"participation must be one of {PARTICIPATIONS}, got {participation!r}")
  z = float(noise_multiplier)
  sizes = tree_sizes(num_rounds, restart_every)
  if participation == "once":
    # A tuple: events must be hashable (the ledger counts equal events).
    return dp_accounting.SingleEpochTreeAggregationDpEvent(z, tuple(sizes))
  return dp_accounting.ComposedDpEvent(tuple(
      dp_accounting.SingleEpochTreeAggregationDpEvent(z, s) for s in sizes))


def round_event(round_index: int, noise_multiplier: float, num_rounds: int,
                restart_every: int,
                participation: str = "once_per_tree") -> dp_accounting.DpEvent:
  """The event to record for round `round_index` in a per-round ledger.

  A tree's privacy is not a sum over its steps, so the whole tree's event is
  recorded when the tree starts (before any of its results exist; a run
  stopped early has then accounted for at least what it released, since a
  larger tree is never more private) and NoOpDpEvent in its other rounds.
  For "once" the whole run's event is recorded in round 0. Composing the
  events of all rounds gives exactly `dp_event`.
  """
  if participation not in PARTICIPATIONS:
    raise ValueError(
        f"participation must be one of {PARTICIPATIONS}, got {participation!r}")
  r, big_r = int(round_index), int(restart_every)
  z = float(noise_multiplier)
  if participation == "once":
    if r == 0:
      return dp_event(z, num_rounds, restart_every, "once")
    return dp_accounting.NoOpDpEvent()
  if r % big_r == 0:
    return dp_accounting.SingleEpochTreeAggregationDpEvent(
        z, min(big_r, int(num_rounds) - r))
  return dp_accounting.NoOpDpEvent()


def tree_depth(steps: int) -> int:
  """Nodes a single step's value reaches in a tree of `steps` steps."""
  return math.ceil(math.log2(steps + 1))


# --- Several participations in one tree (no restarts) ------------------------


@jax.jit
def _max_plus(a: jax.Array, b: jax.Array) -> jax.Array:
  """(max, +) matrix product: out[i, j] = max_g a[i, g] + b[g, j]."""
  return jnp.max(a[:, :, None] + b[None, :, :], axis=1)


@functools.lru_cache(maxsize=64)
def max_sensitivity_squared(num_steps: int, max_participations: int,
                            min_separation: int) -> float:
  """The largest sum of squared node counts one client can cause in a tree
  of `num_steps` steps (no restarts), taking part in at most
  `max_participations` steps, any two at least `min_separation` apart.

  A client in steps t_1 < ... < t_m changes each released node (a complete
  dyadic range of steps) by its count there times at most C, so the L2
  sensitivity of everything the tree releases is C times the square root of
  this sum. Computed exactly by dynamic programming over the tree (Kairouz
  et al. 2021, Appendix D): for a subtree, the best sum for m participations
  with the first at least `lead` steps from its left edge and the last at
  least `tail` from its right edge; two children join with a (max, +)
  product over the gap between them. Checked against exhaustive search on
  small trees (tests/test_tree_aggregation.py).

  Args:
    num_steps: T >= 1, the steps (rounds) of the tree.
    max_participations: k >= 1.
    min_separation: b >= 1: a client's steps i < j satisfy j - i >= b.

  Raises:
    ValueError: for a value out of range.
  """
  for name, value in (("num_steps", num_steps),
                      ("max_participations", max_participations),
                      ("min_separation", min_separation)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
  # No more participations fit than 1 + (T - 1) // b; one reaches at most
  # the tree's depth of nodes (the first step reaches that many).
  k = min(max_participations, 1 + (num_steps - 1) // min_separation)
  if k == 1:
    return float(tree_depth(num_steps))
  width = min_separation  # lead, tail in 0..b-1

  @functools.lru_cache(maxsize=None)
  def best(size: int) -> np.ndarray:
    """[m, lead, tail] -> the best sum in a subtree of `size` steps."""
    out = np.full((k + 1, width, width), -np.inf, np.float32)
    out[0] = 0.0
    if size == 1:
      out[1, 0, 0] = 1.0
      return out
    complete = size & (size - 1) == 0  # the subtree's root is a node
    left = size // 2 if complete else 1 << (size.bit_length() - 1)
    right = size - left
    in_left, in_right = best(left), best(right)
    gaps = np.arange(width)
    # A lead (tail) constraint reaching past an empty child moves on to the
    # other one.
    past_left = np.minimum(np.maximum(gaps - left, 0), width - 1)
    past_right = np.minimum(np.maximum(gaps - right, 0), width - 1)
    for m in range(1, k + 1):
      total = np.maximum(in_right[m][past_left, :], in_left[m][:, past_right])
      for m_left in range(1, m):
        a, c = in_left[m_left], in_right[m - m_left]
        if np.isfinite(a).any() and np.isfinite(c).any():
          # The left child's last step at least g from its right edge lets
          # the right child's first be b - 1 - g from its left edge.
          total = np.maximum(total, np.asarray(_max_plus(a, c[::-1])))
      out[m] = total + (m * m if complete else 0)
    return out

  return float(np.max(best(num_steps)[:, 0, 0]))


def multi_participation_event(noise_multiplier: float, num_steps: int,
                              max_participations: int,
                              min_separation: int) -> dp_accounting.DpEvent:
  """The event of one tree of `num_steps` steps without restarts, each
  client in at most `max_participations` steps at least `min_separation`
  apart: a Gaussian mechanism of L2 sensitivity sqrt(s) C and noise z C per
  node (s = `max_sensitivity_squared`), i.e. GaussianDpEvent(z / sqrt(s)),
  rho = s / (2 z^2) zCDP. Privacy: under REPLACE_SPECIAL (one client's
  data replaced by the empty record), with no amplification credited (the
  schema may fix who takes part when).
  """
  z = float(noise_multiplier)
  if not z >= 0 or math.isinf(z):
    raise ValueError(f"noise_multiplier must be finite and >= 0, got {z!r}")
  if z == 0:
    return dp_accounting.NonPrivateDpEvent()
  s = max_sensitivity_squared(num_steps, max_participations, min_separation)
  return dp_accounting.GaussianDpEvent(z / math.sqrt(s))
