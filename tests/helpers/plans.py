"""Privacy plans for tests that check one mechanism's events directly."""

from fedjax_dp.privacy import plan as plan_lib
from fedjax_dp.privacy import sampling


def plan_for(sampler: sampling.Sampler | None = None, *,
             mechanism: str = "gaussian", noise_placement: str = "central",
             count_stddev: float | None = None, noise_multiplier: float = 1.0,
             **fields) -> plan_lib.PrivacyPlan:
  """The plan of a run with this sampler (default: Poisson, q = 0.1 of 100
  clients, no truncation) and mechanism; `count_stddev` turns on adaptive
  clipping with that sigma_b."""
  if sampler is None:
    sampler = sampling.PoissonSampler(100, 0.1, capacity=100)
  return plan_lib.PrivacyPlan(
      noise=plan_lib.Noise(mechanism),
      placement=plan_lib.Placement(noise_placement), sampler=sampler,
      noise_multiplier=noise_multiplier, clip_norm=1.0, delta=1e-5,
      accountant="rdp", num_rounds=getattr(sampler, "num_rounds", 1),
      adaptive_clip=count_stddev is not None,
      count_stddev=count_stddev or 0.0, **fields)
