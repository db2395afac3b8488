"""Shared pytest configuration."""

import os

import hypothesis

# Property tests draw their examples from a fixed seed so that CI runs are
# reproducible: a failure seen once is seen again on the same commit. Set
# HYPOTHESIS_PROFILE=explore to draw fresh examples locally.
hypothesis.settings.register_profile("ci", derandomize=True)
hypothesis.settings.register_profile("explore", derandomize=False)
hypothesis.settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE", "ci"))
