"""Tests for the background prefetcher."""

import threading
import time

import pytest

from fedjax_dp.data import prefetch

# Generous: only reached if the code under test is broken.
_WAIT_S = 10.0


def test_yields_results_in_order():
  with prefetch.Prefetcher(lambda k: k * k, range(20)) as results:
    assert list(results) == [k * k for k in range(20)]


def test_empty_keys():
  with prefetch.Prefetcher(lambda k: k, []) as results:
    assert not list(results)
    with pytest.raises(StopIteration):
      next(results)


def test_runs_fn_on_another_thread():
  threads = []
  with prefetch.Prefetcher(
      lambda k: threads.append(threading.get_ident()), range(3)) as results:
    list(results)
  assert threads and threading.get_ident() not in threads


def test_overlaps_fn_with_the_consumer():
  # fn(1) must start while the consumer still holds result 0: with serial
  # execution it would only start when the consumer asks for the next item.
  started = {k: threading.Event() for k in range(3)}

  def fn(key):
    started[key].set()
    return key

  with prefetch.Prefetcher(fn, range(3), depth=1) as results:
    assert next(results) == 0
    assert started[1].wait(_WAIT_S)
    assert list(results) == [1, 2]


def test_overlap_saves_time():
  def slow(key):
    time.sleep(0.05)
    return key

  start = time.perf_counter()
  with prefetch.Prefetcher(slow, range(10)) as results:
    for _ in results:
      time.sleep(0.05)
  # Serial would take >= 1.0 s; overlapped about 0.55 s.
  assert time.perf_counter() - start < 0.9


def test_bounded_lookahead():
  calls = []

  def fn(key):
    calls.append(key)
    return key

  with prefetch.Prefetcher(fn, range(100), depth=2) as results:
    assert next(results) == 0
    deadline = time.monotonic() + 0.3
    while time.monotonic() < deadline:
      time.sleep(0.01)
    # One taken + `depth` waiting + one computed and blocked on the queue.
    assert len(calls) <= 1 + 2 + 1
    assert list(results) == list(range(1, 100))


def test_exception_reraises_in_caller_after_earlier_results():
  def fn(key):
    if key == 3:
      raise KeyError("bad key 3")
    return key

  results = prefetch.Prefetcher(fn, range(10))
  got = []
  with pytest.raises(KeyError, match="bad key 3"):
    for value in results:
      got.append(value)
  assert got == [0, 1, 2]
  assert not results.running
  with pytest.raises(StopIteration):
    next(results)


def test_exception_from_keys_iterator_reraises():
  def keys():
    yield 0
    raise RuntimeError("keys broke")

  with prefetch.Prefetcher(lambda k: k, keys()) as results:
    assert next(results) == 0
    with pytest.raises(RuntimeError, match="keys broke"):
      next(results)


def test_close_stops_the_thread_on_infinite_keys():
  def forever():
    k = 0
    while True:
      yield k
      k += 1

  results = prefetch.Prefetcher(lambda k: k, forever(), depth=3)
  assert [next(results) for _ in range(5)] == [0, 1, 2, 3, 4]
  results.close()
  assert not results.running
  with pytest.raises(StopIteration):
    next(results)


def test_context_manager_closes_on_early_exit():
  with prefetch.Prefetcher(lambda k: k, range(1000), depth=2) as results:
    for value in results:
      if value == 2:
        break
  assert not results.running


def test_close_waits_for_fn_in_progress():
  entered, finish = threading.Event(), threading.Event()
  done = []

  def fn(key):
    entered.set()
    finish.wait(_WAIT_S)
    done.append(key)
    return key

  results = prefetch.Prefetcher(fn, range(5))
  assert entered.wait(_WAIT_S)
  threading.Timer(0.05, finish.set).start()
  results.close()
  assert not results.running
  assert done == [0]


def test_depth_must_be_positive():
  with pytest.raises(ValueError):
    prefetch.Prefetcher(lambda k: k, range(3), depth=0)
