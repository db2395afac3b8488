"""Every metric a run writes is classified, and the README lists every one
that is not private."""

import pathlib

import jax
import pytest

from fedjax_dp import config as config_lib
from fedjax_dp import diagnostics
from fedjax_dp import runner
from fedjax_dp import simulation

README = pathlib.Path(__file__).parent.parent / "README.md"

_MECHANISMS = [
    {}, {"adaptive_clipping": True, "clip_count_stddev": 2.0},
    {"mechanism": "laplace"},
    {"noise_placement": "local"}, {"noise_placement": "distributed"},
    {"noise_placement": "distributed", "secagg_bits": 24,
     "accountant": "rdp"},
    {"mechanism": "tree", "sampling": "disjoint", "accountant": "rdp",
     "tree_restart_every": 2},
    {"example_clip_norm": 1.0, "example_noise_multiplier": 1.0},
]


def _round_metric_names(changes) -> set[str]:
  """The metrics a round of this configuration returns (traced, not run)."""
  config = config_lib.Config(
      dataset_kwargs={"num_clients": 60}, cohort_size=10, rounds=4,
      **changes)
  sim = simulation.build(config)
  streams = sim.streams()
  block = sim.prepare(0, streams, jax.jit(sim.plan.sampler.sample_round))[0]
  _, metrics = jax.eval_shape(
      sim.round_fn(), sim.initial_state(0), block, sim.hparams(),
      streams.noise, None, sim.plan.adaptive_hparams(),
      sim.plan.secagg_params())
  return set(metrics)


@pytest.fixture(scope="module")
def written_names():
  result = runner.run(config_lib.Config(
      dataset_kwargs={"num_clients": 60}, cohort_size=10, rounds=2,
      eval_every=2, adaptive_clipping=True, clip_count_stddev=2.0),
                      progress=False,
                      log=lambda s: None)
  names = set().union(*(set(m) for m in result.history))
  for changes in _MECHANISMS:
    names |= _round_metric_names(changes)
  # Returned by the round for the runner, which writes what follows from it.
  names -= {"canary_cosines"}
  return names


@pytest.mark.slow
def test_every_metric_is_classified(written_names):
  assert written_names <= set(diagnostics.METRICS), (
      written_names - set(diagnostics.METRICS))
  assert {"example_epsilon"} - set(diagnostics.METRICS) == set()


def test_readme_lists_every_metric_that_is_not_private():
  text = README.read_text()
  section = text[text.index("### What is not private"):]
  section = section[:section.index("\n## ")]
  for name in diagnostics.not_private():
    assert f"`{name}`" in section, name
  # And nothing private is listed there as not private.
  for name, (kind, _) in diagnostics.METRICS.items():
    if kind != diagnostics.NOT_PRIVATE:
      assert f"| `{name}` |" not in section, name
