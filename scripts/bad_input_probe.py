"""Probes `fedjax-dp train` with many invalid and extreme config values.

Every config field gets a list of bad or extreme values (`--set FIELD=V`),
plus combinations that are only wrong together; each case runs in this
process through `cli.main` under a per-case time limit. A case passes when it
exits 0 (a valid run) or exits 2 with exactly one line on stderr; anything
else -- another exit status, several lines (a traceback), an exception that
escapes, or running past the limit -- is printed as a finding.

    python scripts/bad_input_probe.py [--limit-s 30] [--fields rounds,seed]

Prints one line per case, then the counts and the findings; exits 1 if there
are findings.
"""

import argparse
import contextlib
import dataclasses
import io
import os
import signal
import sys
import tempfile
import time

from fedjax_dp import cli
from fedjax_dp import config as config_lib

_BASE = ["--set", "dataset=synthetic", "--set",
         'dataset_kwargs={"num_clients": 30, "max_examples": 10}',
         "--set", "model=logistic", "--set", "cohort_size=5",
         "--set", "rounds=1", "--set", "eval_every=1", "--set", "delta=0.001"]
_VALUES = ["abc", "-1", "0", "1e400", "-inf", "nan", "NaN", "null", "true",
           "[]", "{}", '{"a": 1}', "1.5", "2**70", "99999999999999999999999",
           "''", '"x"', "1e9"]
# Fields whose large valid values run for a long time by design.
_LONG_WHEN_LARGE = ("rounds",)
_COMBINATIONS = [
    ['dataset_kwargs={"num_clients": 1}'],
    ['dataset_kwargs={"num_clients": -5}'], ['dataset_kwargs={"alpha": -1}'],
    ['dataset_kwargs={"max_examples": 0}'],
    ['dataset_kwargs={"eval_fraction": 1.5}'],
    ['dataset_kwargs={"eval_fraction": 1}'],
    ["dataset=file",
     'dataset_kwargs={"path": "/nonexistent.npz", "num_classes": 2}'],
    ["dataset=file", 'dataset_kwargs={"path": "/etc/hostname", '
     '"num_classes": 2}'],
    ["dataset=file", 'dataset_kwargs={"path": "data.npz"}'],
    ["dataset=shakespeare", "dataset_kwargs={}"],
    ["dataset=shakespeare", 'dataset_kwargs={"path": "/etc/hostname"}'],
    ["model=cnn"], ["model=gru_lm"], ["model=transformer_lm"],
    ["cohort_size=1000"], ["capacity=1"], ['model_kwargs={"hidden": [-3]}'],
    ["model=mlp_2nn", 'model_kwargs={"hidden": []}'],
    ["model=mlp_2nn", 'model_kwargs={"hidden": [0]}'],
    ["model=mlp_2nn", 'model_kwargs={"hidden": 5}'],
    ["model=mlp_2nn", 'model_kwargs={"hidden": "wide"}'],
    ["rounds_per_call=4", "dropout_rate=0.5"],
    ["noise_placement=distributed", "min_participants=100"],
    ["secagg_bits=2", "noise_placement=distributed"],
    ["mechanism=laplace", "adaptive_clipping=true"],
    ["sampling=fixed"], ["sampling=disjoint"], ["mechanism=tree"],
    ["noise_multiplier=null"],
    ["noise_multiplier=null", "target_epsilon=1e-9"],
    ["noise_multiplier=null", "target_epsilon=1e6"],
    ["epsilon_budget=1e-9"], ["example_clip_norm=0.1"],
    ["max_examples_per_client=1000000000"], ["batch_size=100000000"],
    ["local_epochs=100000000"], ["sampling_probability=1", "cohort_size=null"],
    ["audit_canaries=1000000000"], ["clients_per_chunk=1000000"],
    ["per_layer_clipping=uniform", "noise_placement=local"],
    ["rounds=1000000000", "epsilon_budget=1"],
    ["client_lr=1e30", "rounds=6"], ["server_lr=1e38", "clip_norm=10",
                                     "noise_multiplier=5", "rounds=4"],
]


class _OverTime(BaseException):
  pass


def _on_alarm(signum, frame):
  del signum, frame
  raise _OverTime()


def _cases(fields):
  names = [f.name for f in dataclasses.fields(config_lib.Config)
           if f.name != "name" and (not fields or f.name in fields)]
  for name in names:
    for value in _VALUES:
      if name in _LONG_WHEN_LARGE and value in ("1e9", "1e400",
                                                 "99999999999999999999999"):
        continue
      yield [f"{name}={value}"]
  if not fields:
    yield from _COMBINATIONS


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--limit-s", type=int, default=30)
  parser.add_argument("--fields", default="",
                      help="comma-separated fields (default: all, and the "
                      "combinations)")
  args = parser.parse_args()
  fields = [f for f in args.fields.split(",") if f]
  signal.signal(signal.SIGALRM, _on_alarm)
  counts = {"exit 0": 0, "exit 2, one line": 0}
  findings = []
  with tempfile.TemporaryDirectory() as tmp:
    os.chdir(tmp)
    for i, sets in enumerate(_cases(fields)):
      argv = ["train", "--no-progress", "--run-dir", f"{tmp}/r{i}", *_BASE]
      for assignment in sets:
        argv += ["--set", assignment]
      out, err = io.StringIO(), io.StringIO()
      start = time.perf_counter()
      signal.alarm(args.limit_s)
      try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
          code = cli.main(argv)
      except _OverTime:
        findings.append((sets, f"over {args.limit_s} s"))
        continue
      except BaseException as e:  # pylint: disable=broad-except
        findings.append((sets, f"raised {type(e).__name__}: {e}"))
        continue
      finally:
        signal.alarm(0)
      lines = err.getvalue().strip().splitlines()
      if code == 0:
        counts["exit 0"] += 1
      elif code == 2 and len(lines) == 1:
        counts["exit 2, one line"] += 1
      else:
        findings.append((sets, f"exit {code}: {err.getvalue().strip()}"))
      print(f"{sets} -> {code} ({time.perf_counter() - start:.1f} s) "
            f"{lines[-1] if lines else ''}"[:200], flush=True)
  print(counts, f"findings: {len(findings)}")
  for sets, what in findings:
    print("FINDING", sets, what[:500])
  return 1 if findings else 0


if __name__ == "__main__":
  sys.exit(main())
