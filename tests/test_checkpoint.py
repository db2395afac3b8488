"""Checkpoints: exact round trips, atomicity under crashes, corrupt files."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_dp import checkpoint
from fedjax_dp.privacy import ledger_codec
from fedjax_dp import server
from fedjax_dp.privacy import accounting
from fedjax_dp.privacy import clipping

ADD_REMOVE = clipping.NeighbouringRelation.ADD_OR_REMOVE_ONE

_GAUSS = dp_accounting.GaussianDpEvent(1.1)
EVENTS = [
    dp_accounting.PoissonSampledDpEvent(0.01, _GAUSS),
    dp_accounting.GaussianDpEvent(0.7234567891234567),
    dp_accounting.TruncatedSubsampledGaussianDpEvent(
        dataset_size=1001, sampling_probability=0.1, truncated_batch_size=150,
        noise_multiplier=1.3),
    dp_accounting.SampledWithoutReplacementDpEvent(
        source_dataset_size=500, sample_size=20,
        event=dp_accounting.GaussianDpEvent(0.55)),
    dp_accounting.LaplaceDpEvent(2.5),
    dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(1 / 3, _GAUSS), 17),
    dp_accounting.ComposedDpEvent([
        _GAUSS,
        dp_accounting.SelfComposedDpEvent(dp_accounting.LaplaceDpEvent(0.1),
                                          3),
        dp_accounting.ComposedDpEvent([]),
        dp_accounting.ComposedDpEvent((_GAUSS, _GAUSS)),
    ]),
    dp_accounting.ComposedDpEvent((_GAUSS,)),
    dp_accounting.NoOpDpEvent(),
    dp_accounting.NonPrivateDpEvent(),
    dp_accounting.ZCDpEvent(0.0123),
    dp_accounting.SingleEpochTreeAggregationDpEvent(1.7, 64),
    dp_accounting.SingleEpochTreeAggregationDpEvent(1.7, (64, 64, 7)),
]


def _params():
  return {"dense": {"w": jnp.arange(12, dtype=jnp.float32).reshape(3, 4) / 7,
                    "b": jnp.full((4,), -0.3, jnp.float32)},
          "emb": jnp.ones((5, 2), jnp.bfloat16)}


_ADAM = server.server_optimizer("adam")
_server_step = jax.jit(server.step, static_argnums=3)


def _state(seed: int = 0):
  """A realistic run state: Adam server state after two steps, typed keys."""
  state = server.init(_params(), _ADAM)
  for r in range(2):
    delta = jax.tree_util.tree_map(
        lambda x, r=r: jnp.full(x.shape, 0.01 * (r + 1 + seed), x.dtype),
        state.params)
    state = _server_step(state, delta, 0.5 + r, _ADAM)
  return {"server": state,
          "noise_key": jax.random.fold_in(jax.random.key(seed), 2),
          "sample_key": jax.random.key(seed + 100)}


def _fresh_like():
  return {"server": server.init(_params(), _ADAM),
          "noise_key": jax.random.key(0), "sample_key": jax.random.key(0)}


def _ledger(rounds: int) -> accounting.PrivacyLedger:
  ledger = accounting.PrivacyLedger(ADD_REMOVE, 1e-5, "rdp")
  for r in range(rounds):
    ledger.record(r, EVENTS[0])
  return ledger


def _assert_trees_equal(a, b):
  la, ta = jax.tree_util.tree_flatten(a)
  lb, tb = jax.tree_util.tree_flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      assert y.dtype == x.dtype
      np.testing.assert_array_equal(jax.random.key_data(x),
                                    jax.random.key_data(y))
    else:
      assert x.dtype == y.dtype and x.shape == y.shape
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ---------------------------------------------------------------------------
# DP events and the ledger.


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: type(e).__name__)
def test_event_round_trips_exactly_through_json(event):
  text = json.dumps(ledger_codec.encode_event(event))
  back = ledger_codec.decode_event(json.loads(text))
  assert back == event
  assert type(back) is type(event)
  assert repr(back) == repr(event)
  try:
    hash(event)
  except TypeError:  # a ComposedDpEvent over a list is unhashable
    return
  assert hash(back) == hash(event)


def test_decode_event_rejects_unknown_and_malformed():
  with pytest.raises(ValueError, match="known type"):
    ledger_codec.decode_event({"type": "NoSuchDpEvent"})
  with pytest.raises(ValueError, match="keys"):
    ledger_codec.decode_event({"type": "GaussianDpEvent"})
  with pytest.raises(ValueError, match="number"):
    ledger_codec.decode_event({"type": "GaussianDpEvent",
                             "noise_multiplier": "1.0"})
  with pytest.raises(ValueError, match="cannot encode"):
    ledger_codec.encode_event(dp_accounting.UnsupportedDpEvent())
  with pytest.raises(ValueError, match="list of them"):
    ledger_codec.decode_event({"type": "SingleEpochTreeAggregationDpEvent",
                             "noise_multiplier": 1.0, "step_counts": [3.5]})


def test_ledger_round_trip_keeps_rounds_and_epsilon():
  ledger = accounting.PrivacyLedger(ADD_REMOVE, 1e-6, "rdp")
  for r, event in enumerate(EVENTS[:2] * 3):
    ledger.record(r, event)
  back = ledger_codec.decode_ledger(
      json.loads(json.dumps(ledger_codec.encode_ledger(ledger))))
  assert [(e.round, e.event) for e in back.entries] == \
      [(e.round, e.event) for e in ledger.entries]
  assert (back.relation, back.delta, back.accountant) == \
      (ledger.relation, ledger.delta, ledger.accountant)
  assert back.epsilon() == ledger.epsilon()


def test_decode_ledger_rejects_repeated_round():
  data = ledger_codec.encode_ledger(_ledger(2))
  data["entries"][1]["round"] = 0
  with pytest.raises(ValueError, match="already"):
    ledger_codec.decode_ledger(data)


# ---------------------------------------------------------------------------
# Round trip.


def test_round_trip_server_state_keys_and_ledger(tmp_path):
  state = _state(seed=3)
  ledger = _ledger(7)
  meta = {"ledger": ledger_codec.encode_ledger(ledger),
          "config": {"name": "x", "clip_norm": 0.1, "rounds": None}}
  checkpoint.save(tmp_path, 7, state, meta)
  assert checkpoint.latest(tmp_path) == 7

  restored, meta_back = checkpoint.restore(tmp_path, 7, _fresh_like())
  _assert_trees_equal(state, restored)
  assert isinstance(restored["server"], server.ServerState)
  assert int(restored["server"].round) == 2
  assert meta_back == json.loads(json.dumps(meta))
  assert ledger_codec.decode_ledger(meta_back["ledger"]).epsilon() == \
      ledger.epsilon()
  # The restored state keeps training exactly like the original.
  delta = jax.tree_util.tree_map(lambda x: jnp.full(x.shape, 0.2, x.dtype),
                                 state["server"].params)
  _assert_trees_equal(_server_step(state["server"], delta, 0.3, _ADAM),
                      _server_step(restored["server"], delta, 0.3, _ADAM))
  np.testing.assert_array_equal(
      jax.random.normal(state["noise_key"], (4,)),
      jax.random.normal(restored["noise_key"], (4,)))


def test_restore_into_abstract_like_tree(tmp_path):
  state = _state()
  checkpoint.save(tmp_path, 1, state, {})
  restored, _ = checkpoint.restore(tmp_path, 1, jax.eval_shape(_state))
  _assert_trees_equal(state, restored)


def test_restore_into_other_structure_is_a_clear_error(tmp_path):
  checkpoint.save(tmp_path, 1, _state(), {})
  like = _fresh_like()
  like["server"] = server.init({"w": jnp.zeros(3)},
                               server.server_optimizer("adam"))
  with pytest.raises(checkpoint.CheckpointError, match="different state"):
    checkpoint.restore(tmp_path, 1, like)
  wrong_shape = _fresh_like()
  wrong_shape["server"] = wrong_shape["server"]._replace(
      round=jnp.zeros((2,), jnp.int32))
  with pytest.raises(checkpoint.CheckpointError, match="round"):
    checkpoint.restore(tmp_path, 1, wrong_shape)


def test_bad_metadata_writes_nothing(tmp_path):
  with pytest.raises(ValueError, match="JSON"):
    checkpoint.save(tmp_path, 1, _state(), {"x": object()})
  assert checkpoint.latest(tmp_path) is None
  assert checkpoint.latest(tmp_path / "does-not-exist") is None


# ---------------------------------------------------------------------------
# Retention.


def test_keeps_last_n(tmp_path):
  for step in range(1, 6):
    checkpoint.save(tmp_path, step, _state(), {"step": step})
  assert checkpoint.all_steps(tmp_path) == [4, 5]
  for step in range(6, 9):
    checkpoint.save(tmp_path, step, _state(), {"step": step}, keep=3)
  assert checkpoint.all_steps(tmp_path) == [6, 7, 8]
  checkpoint.save(tmp_path, 9, _state(), {"step": 9}, keep=1)
  assert checkpoint.all_steps(tmp_path) == [9]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_9"]


def test_resaving_a_step_replaces_it_and_rollback_drops_later_steps(tmp_path):
  for step in (1, 2, 3):
    checkpoint.save(tmp_path, step, _state(), {"step": step}, keep=3)
  checkpoint.save(tmp_path, 3, _state(seed=1), {"step": 3, "again": True},
                  keep=3)
  restored, meta = checkpoint.restore(tmp_path, 3, _fresh_like())
  assert meta["again"]
  _assert_trees_equal(restored, _state(seed=1))
  # Saving an earlier step means the run went back to it: later ones go.
  checkpoint.save(tmp_path, 2, _state(), {"step": 2}, keep=3)
  assert checkpoint.all_steps(tmp_path) == [1, 2]


# ---------------------------------------------------------------------------
# Crashes in the middle of a save.


class _Crash(Exception):
  pass


def _check_consistent(directory, allowed_steps):
  step = checkpoint.latest(directory)
  assert step in allowed_steps
  restored, meta = checkpoint.restore(directory, step, _fresh_like())
  assert meta == {"step": step}
  _assert_trees_equal(restored, _state(seed=step))
  return step


@pytest.mark.parametrize("crash_at", range(1, 6))
def test_crash_at_each_fsync_leaves_a_complete_checkpoint(
    tmp_path, monkeypatch, crash_at):
  checkpoint.save(tmp_path, 1, _state(seed=1), {"step": 1})
  calls = []
  real_fsync = os.fsync

  def crashing_fsync(fd):
    calls.append(fd)
    if len(calls) == crash_at:
      raise _Crash()
    real_fsync(fd)

  monkeypatch.setattr(os, "fsync", crashing_fsync)
  with pytest.raises(_Crash):
    checkpoint.save(tmp_path, 2, _state(seed=2), {"step": 2})
  monkeypatch.undo()
  # fsyncs: arrays, metadata, manifest, temp folder, then the parent folder
  # after the commit rename: only the last crash point sees the new one.
  step = _check_consistent(tmp_path, {1, 2})
  assert step == (2 if crash_at == 5 else 1)
  checkpoint.save(tmp_path, 3, _state(seed=3), {"step": 3})
  assert checkpoint.all_steps(tmp_path) == ([2, 3] if crash_at == 5 else
                                            [1, 3])
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_crash_while_writing_arrays(tmp_path, monkeypatch):
  checkpoint.save(tmp_path, 1, _state(seed=1), {"step": 1})
  real_savez = np.savez

  def half_savez(f, **arrays):
    real_savez(f, **arrays)
    f.truncate(f.tell() // 2)
    raise _Crash()

  monkeypatch.setattr(np, "savez", half_savez)
  with pytest.raises(_Crash):
    checkpoint.save(tmp_path, 2, _state(seed=2), {"step": 2})
  monkeypatch.undo()
  # A failure the writer sees (a full disk, an exception) removes its
  # partial folder; one it cannot see (SIGKILL) leaves it to the next save.
  assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
  assert _check_consistent(tmp_path, {1}) == 1


def test_crash_while_deleting_old_checkpoints(tmp_path, monkeypatch):
  for step in (1, 2):
    checkpoint.save(tmp_path, step, _state(seed=step), {"step": step})

  def crashing_rmtree(path, ignore_errors=False):
    del ignore_errors
    (pathlib.Path(path) / checkpoint.ARRAYS_FILE).unlink()
    raise _Crash()

  monkeypatch.setattr(checkpoint.shutil, "rmtree", crashing_rmtree)
  with pytest.raises(_Crash):
    checkpoint.save(tmp_path, 3, _state(seed=3), {"step": 3})
  monkeypatch.undo()
  # The half-deleted step 1 had been renamed away first.
  assert checkpoint.all_steps(tmp_path) == [2, 3]
  assert _check_consistent(tmp_path, {3}) == 3


# Imports once, then forks a writer per "life" on request (a fresh Python per
# life would spend ~2 s importing). A writer resumes from the latest
# checkpoint and saves rounds in a loop until it is SIGKILLed. The zygote never
# starts a JAX backend, so forking it is safe.
_ZYGOTE = textwrap.dedent("""
    import os
    import sys

    import dp_accounting
    import jax
    import numpy as np

    from fedjax_dp import checkpoint
    from fedjax_dp.privacy import accounting
    from fedjax_dp.privacy import ledger_codec
    from fedjax_dp.privacy import clipping

    SHAPE = (512, 1024)


    def writer(directory):
      event = dp_accounting.PoissonSampledDpEvent(
          0.01, dp_accounting.GaussianDpEvent(1.1))
      step = checkpoint.latest(directory)
      if step is None:
        step = 0
        ledger = accounting.PrivacyLedger(
            clipping.NeighbouringRelation.ADD_OR_REMOVE_ONE, 1e-5)
      else:
        like = {"w": np.zeros(SHAPE, np.float32), "round": np.int32(0),
                "key": jax.random.key(0)}
        _, meta = checkpoint.restore(directory, step, like)
        ledger = ledger_codec.decode_ledger(meta["ledger"])
      first = True
      while True:
        step += 1
        ledger.record(step - 1, event)  # the round's event, before its save
        tree = {"w": np.full(SHAPE, step, np.float32), "round": np.int32(step),
                "key": jax.random.key(step)}
        meta = {"step": step, "ledger": ledger_codec.encode_ledger(ledger)}
        checkpoint.save(directory, step, tree, meta)
        if first:  # a checkpoint of this life exists before the first kill
          print(f"ready {os.getpid()}", flush=True)
          first = False


    print("zygote", flush=True)
    for line in sys.stdin:
      command, argument = line.rstrip("\\n").split(" ", 1)
      if command == "reap":  # wait until the killed writer is gone
        os.waitpid(int(argument), 0)
        print("reaped", flush=True)
      elif os.fork() == 0:
        writer(argument)
        os._exit(0)
""")


def _check_writer_checkpoint(directory, previous):
  like = {"w": np.zeros((512, 1024), np.float32), "round": np.int32(0),
          "key": jax.random.key(0)}
  step = checkpoint.latest(directory)
  assert step is not None and step > previous
  tree, meta = checkpoint.restore(directory, step, like)
  assert meta["step"] == step
  assert int(tree["round"]) == step
  assert np.all(tree["w"] == step)
  np.testing.assert_array_equal(jax.random.key_data(tree["key"]),
                                jax.random.key_data(jax.random.key(step)))
  ledger = ledger_codec.decode_ledger(meta["ledger"])
  assert [e.round for e in ledger.entries] == list(range(step))
  assert len(checkpoint.all_steps(directory)) <= 3  # keep=2, +1 mid-delete
  return step


def test_sigkill_at_random_times_always_leaves_a_complete_checkpoint(
    tmp_path):
  """A writer SIGKILLed at random times, resumed each time, ten times.

  After every kill `latest` + `restore` must give a complete, consistent
  checkpoint whose ledger holds each round exactly once, and the next life
  must resume from it.
  """
  script = tmp_path / "zygote.py"
  script.write_text(_ZYGOTE)
  directory = tmp_path / "run"
  rng = np.random.default_rng(1234)
  zygote = subprocess.Popen([sys.executable, str(script)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
  step = 0
  interrupted = {"write": 0, "delete": 0}
  try:
    assert zygote.stdout.readline().strip() == "zygote"
    for _ in range(10):
      zygote.stdin.write(f"fork {directory}\n")
      zygote.stdin.flush()
      ready, pid = zygote.stdout.readline().split()
      assert ready == "ready"
      time.sleep(rng.uniform(0.0, 0.25))
      os.kill(int(pid), signal.SIGKILL)
      zygote.stdin.write(f"reap {pid}\n")
      zygote.stdin.flush()
      assert zygote.stdout.readline().strip() == "reaped"
      names = [p.name for p in directory.iterdir()]
      interrupted["write"] += any(n.startswith(".tmp") for n in names)
      interrupted["delete"] += any(n.startswith(".trash") for n in names)
      step = _check_writer_checkpoint(directory, step)
  finally:
    zygote.stdin.close()
    zygote.wait(timeout=60)
    zygote.stdout.close()
  print(f"kills that interrupted a write / a deletion: {interrupted}")


# ---------------------------------------------------------------------------
# Corrupt, truncated and missing files.


def _truncate(path):
  path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def _garble(path):
  data = bytearray(path.read_bytes())
  mid = len(data) // 2
  for i in range(mid, min(mid + 8, len(data))):
    data[i] ^= 0x5A
  path.write_bytes(bytes(data))


@pytest.mark.parametrize("name", [checkpoint.ARRAYS_FILE,
                                  checkpoint.METADATA_FILE,
                                  checkpoint.MANIFEST_FILE])
@pytest.mark.parametrize("damage,problem,latest_skips", [
    (_truncate, "truncated|corrupt", True),
    (_garble, "corrupt", False),
    (pathlib.Path.unlink, "missing", True),
])
def test_damaged_file_is_a_checkpoint_error_naming_it(
    tmp_path, name, damage, problem, latest_skips):
  checkpoint.save(tmp_path, 1, _state(seed=1), {"step": 1})
  checkpoint.save(tmp_path, 2, _state(seed=2), {"step": 2})
  path = tmp_path / "ckpt_2" / name
  damage(path)
  with pytest.raises(checkpoint.CheckpointError, match=problem) as info:
    checkpoint.restore(tmp_path, 2, _fresh_like())
  assert str(path) in str(info.value)
  assert isinstance(info.value, ValueError)
  # A damaged manifest or a file of the wrong size makes the checkpoint
  # incomplete, and `latest` falls back to the previous one; same-size
  # garbling of a data file is only caught by `restore`'s checksums.
  expect_skip = latest_skips or name == checkpoint.MANIFEST_FILE
  assert checkpoint.latest(tmp_path) == (1 if expect_skip else 2)
  restored, _ = checkpoint.restore(tmp_path, 1, _fresh_like())
  _assert_trees_equal(restored, _state(seed=1))


def test_missing_step_names_what_exists(tmp_path):
  checkpoint.save(tmp_path, 4, _state(), {})
  with pytest.raises(checkpoint.CheckpointError, match=r"step 5.*\[4\]"):
    checkpoint.restore(tmp_path, 5, _fresh_like())
