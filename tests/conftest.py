"""Shared pytest configuration."""

import os
import pathlib

import hypothesis
import pytest

from fedjax_dp import compilation_cache

# Compiled programs are kept on disk (JAX's persistent compilation cache),
# shared by the worker processes and by later runs: many tests compile the
# same few rounds. FEDJAX_DP_COMPILATION_CACHE=off turns it off.
os.environ.setdefault(
    compilation_cache.ENV_VAR,
    str(pathlib.Path(__file__).resolve().parent.parent / ".pytest_cache" /
        "fedjax-dp-xla"))
compilation_cache.enable()

# Property tests draw their examples from a fixed seed so that CI runs are
# reproducible: a failure seen once is seen again on the same commit. Set
# HYPOTHESIS_PROFILE=explore to draw fresh examples locally.
hypothesis.settings.register_profile("ci", derandomize=True)
hypothesis.settings.register_profile("explore", derandomize=False)
hypothesis.settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# Parametrizations whose property the other cases of the same test check in
# the default selection (kept under ~10 minutes on a 2-core CPU); they run
# with `-m slow`, which CI also runs.
_SLOW_CASES = frozenset({
    "tests/test_dp_fedavg.py::test_round_equals_reference_loop[" + case + "]"
    for case in (
        "0.05-0.0-2-True-True", "0.05-0.0-4-1-True", "0.05-0.0-2-True-False",
        "0.05-0.0-4-1-False", "1000000.0-0.0-1-1-True",
        "1000000.0-0.0-2-True-True", "1000000.0-0.0-4-1-True",
        "1000000.0-0.0-2-True-False", "0.5-1.0-1-1-True",
        "0.5-1.0-2-True-True", "0.5-1.0-4-1-False")
} | {
    "tests/test_conv_ops.py::test_values_and_gradients_equal_lax[" + case + "]"
    for case in ("x_shape1-k_shape1-SAME", "x_shape2-k_shape2-SAME",
                 "x_shape3-k_shape3-SAME", "x_shape4-k_shape4-SAME")
} | {
    "tests/test_factored.py::test_factored_round_equals_reference[" + case
    + "]"
    for case in ("inf-0.0-cnn-4-False", "inf-0.0-mlp_2nn-None-True",
                 "0.0001-0.0-mlp_2nn-None-True", "0.0001-0.0-logistic-4-True")
} | {
    "tests/test_dp_fedavg.py::test_cnn_round_equals_reference_loop[True]",
    "tests/test_dp_fedavg.py::"
    "test_per_layer_clipping_round_equals_per_group_reference"
    "[size_proportional]",
    "tests/test_factored.py::test_canaries_equal_the_reference[mlp_2nn-True]",
    "tests/test_worst_case_inputs.py::"
    "test_factored_round_clips_a_cancelling_client[cnn-1000000.0-1e-09]",
    "tests/test_resume.py::"
    "test_resume_refuses_a_changed_privacy_setting[noise_multiplier-2.0]",
})


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
  del config
  for item in items:
    if item.nodeid in _SLOW_CASES:
      item.add_marker(pytest.mark.slow)
