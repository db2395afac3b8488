"""Running a helper script in a fresh process with N simulated CPU devices."""

import json
import os
import pathlib
import subprocess
import sys

HELPERS = pathlib.Path(__file__).parent


def env(num_devices: int) -> dict:
  """This process's environment, with `num_devices` XLA:CPU devices."""
  return dict(os.environ,
              XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices}",
              JAX_PLATFORMS="cpu")


def run_json(script: str, num_devices: int, *args: str) -> dict:
  """Runs tests/helpers/<script> there (with `args`); returns its last
  stdout line as JSON."""
  out = subprocess.run([sys.executable, str(HELPERS / script), *args],
                       env=env(num_devices), check=True, capture_output=True,
                       text=True, timeout=600)
  return json.loads(out.stdout.strip().splitlines()[-1])
