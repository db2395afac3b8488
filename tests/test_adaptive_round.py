"""Adaptive clipping as a configuration of the same compiled round."""

import dp_accounting
import numpy as np
import pytest

from fedjax_dp import config as config_lib
from fedjax_dp import runner
from fedjax_dp.privacy import accounting


def _config(**changes):
  return config_lib.Config(
      name="adaptive", dataset="synthetic",
      dataset_kwargs={"num_clients": 200, "max_examples": 30},
      model="logistic", rounds=40, cohort_size=40, batch_size=10,
      local_epochs=1, eval_every=40, delta=1e-3, noise_multiplier=1.0,
      adaptive_clipping=True, clip_norm=0.01, target_unclipped_quantile=0.5,
      capacity=160,
      clip_learning_rate=0.2).replace(**changes)


@pytest.mark.slow
def test_clip_norm_moves_to_the_target_quantile_and_is_accounted_as_z():
  result = runner.run(_config(rounds=60, clip_norm=0.05), progress=False,
                      log=lambda s: None)
  clips = [m["clip_norm"] for m in result.history]
  assert clips[0] == pytest.approx(0.05)
  # Started far below every update norm: all clipped, so C grows by up to
  # e^(eta / 2) = e^0.1 a round.
  assert clips[10] > 2 * clips[0]
  # It ends near the median update norm (the target quantile 0.5).
  late_median = np.mean([m["update_norm_p50"] for m in result.history[-10:]])
  assert late_median / 1.5 < clips[-1] < late_median * 1.5
  # The summary reports where the clip ended (the clip the next round would
  # use), not only the initial one.
  assert result.summary["clip_norm"] == pytest.approx(0.05)
  assert clips[-1] / 1.2 < result.summary["final_clip_norm"] < clips[-1] * 1.2
  # Over the last rounds, about half the clients are clipped. The noisy
  # fraction has std sigma_b / m = 1/20 per round, norms drift as the model
  # trains, and C moves by at most a factor e^0.1 a round: +-0.2 is ~4 such
  # standard errors of a 15-round average.
  late = np.mean([m["fraction_clipped"] for m in result.history[-15:]])
  assert abs(late - 0.5) < 0.2
  # The ledger: both Gaussians under Poisson sampling, whose epsilon equals a
  # single Gaussian with the configured z (the point of the noise split).
  event = result.ledger.events[0]
  q = 40 / 160
  direct = dp_accounting.rdp.RdpAccountant()
  direct.compose(dp_accounting.PoissonSampledDpEvent(
      q, dp_accounting.GaussianDpEvent(1.0)), 60)
  ours = accounting.epsilon_of(result.ledger.events, 1e-3, accountant="rdp",
                               relation=result.ledger.relation)
  assert ours == pytest.approx(direct.get_epsilon(1e-3), rel=1e-6)
  # Recorded as the two releases it is: update and count.
  assert isinstance(event, dp_accounting.PoissonSampledDpEvent)
  assert isinstance(event.event, dp_accounting.ComposedDpEvent)
  assert len(event.event.events) == 2
  # The PLD accountant takes it too (as the equal single Gaussian).
  pld_eps = result.ledger.epsilon("pld")
  assert pld_eps <= ours


def test_count_noise_too_small_for_z_is_refused_before_compute():
  with pytest.raises(ValueError, match="count_stddev"):
    runner.run(_config(noise_multiplier=5.0, clip_count_stddev=1.0),
               progress=False, log=lambda s: None)


@pytest.mark.slow
def test_adaptive_clipping_resumes_with_its_clip_norm(tmp_path):
  config = _config(rounds=4, checkpoint_every=2, eval_every=4)
  straight = runner.run(config, progress=False, log=lambda s: None)
  runner.run(config.replace(rounds=2), run_dir=tmp_path, progress=False,
             log=lambda s: None)
  # Continue the same run to 4 rounds from its round-2 checkpoint.
  (tmp_path / "config.json").write_text(
      (tmp_path / "config.json").read_text().replace('"rounds": 2',
                                                     '"rounds": 4'))
  resumed = runner.run(runner.load_run_config(tmp_path), run_dir=tmp_path,
                       resume=True, progress=False, log=lambda s: None)
  assert resumed.history[0]["round"] == 2
  assert resumed.history[0]["clip_norm"] == pytest.approx(
      straight.history[2]["clip_norm"], rel=1e-6)
