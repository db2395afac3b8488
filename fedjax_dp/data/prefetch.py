"""Preparing the next rounds' data on a background thread.

While the accelerator runs round t, the host can already read and pad the
cohort of round t + 1 (e.g. `source.subset(...)` from a lazy file source
followed by blocking into a `ClientBlock`). `Prefetcher` runs `fn(key)` for
upcoming keys on one thread and hands results back in key order:

  with prefetch.Prefetcher(build_round_block, range(num_rounds)) as blocks:
    for block in blocks:
      state = train_round(state, block)

`fn` must be safe to run on another thread (file sources here are). NumPy,
h5py and sqlite release the GIL while they read, so the overlap is real.
"""

import queue
import threading
from typing import Callable, Generic, Iterable, Iterator, TypeVar

K = TypeVar("K")
V = TypeVar("V")

_POLL_S = 0.05


class _Done:
  """Marks the end of the keys."""


class _Failed:
  """Carries an exception raised by `fn` (or by the keys' iterator)."""

  def __init__(self, exception: BaseException):
    self.exception = exception


def _put(out: queue.Queue, stop: threading.Event, item) -> bool:
  """Queues `item` unless stopped first; returns whether it was queued."""
  while not stop.is_set():
    try:
      out.put(item, timeout=_POLL_S)
      return True
    except queue.Full:
      continue
  return False


def _work(fn: Callable[[K], V], keys: Iterator[K], out: queue.Queue,
          stop: threading.Event) -> None:
  """The background thread: fn over keys into `out`, then a marker."""
  try:
    for key in keys:
      if stop.is_set():
        return
      if not _put(out, stop, fn(key)):
        return
  except BaseException as e:  # pylint: disable=broad-except
    # Everything, KeyboardInterrupt included, goes to the caller's thread.
    _put(out, stop, _Failed(e))
    return
  _put(out, stop, _Done())


class Prefetcher(Generic[K, V], Iterator[V]):
  """Computes `fn(key)` for upcoming keys ahead of the caller.

  Iterating yields `fn(k)` for each `k` of `keys`, in order. At most `depth`
  finished results wait to be taken (plus one being computed), which bounds
  the memory held by prefetched cohorts. If `fn` raises, the results before
  it are yielded and then the exception is re-raised in the caller; the
  thread stops. `close()` (or leaving a `with` block) stops the thread
  without computing further keys.
  """

  def __init__(self, fn: Callable[[K], V], keys: Iterable[K], depth: int = 2):
    """Starts the background thread.

    Args:
      fn: computes the value of one key; runs on the background thread.
      keys: the keys, in the order results are wanted (may be infinite).
      depth: how many finished results may wait; at least 1.

    Raises:
      ValueError: if depth < 1.
    """
    if depth < 1:
      raise ValueError(f"depth must be at least 1, got {depth}")
    self._keys = iter(keys)
    self._queue = queue.Queue(maxsize=depth)
    self._stop = threading.Event()
    self._finished = False
    # The thread gets no reference to `self`, so an abandoned Prefetcher is
    # collected and its __del__ stops the thread.
    self._thread = threading.Thread(
        target=_work, args=(fn, self._keys, self._queue, self._stop),
        name="fedjax_dp-prefetch", daemon=True)
    self._thread.start()

  def __iter__(self) -> "Prefetcher[K, V]":
    return self

  def __next__(self) -> V:
    if self._finished:
      raise StopIteration
    while True:
      try:
        item = self._queue.get(timeout=_POLL_S)
        break
      except queue.Empty:
        if not self._thread.is_alive() and self._queue.empty():
          # Stopped by close() (or died without reporting): nothing to come.
          self._finished = True
          raise StopIteration from None
    if isinstance(item, _Done):
      self._finished = True
      raise StopIteration
    if isinstance(item, _Failed):
      self._finished = True
      self._thread.join()
      raise item.exception
    return item

  def close(self, timeout: float | None = None) -> None:
    """Stops the thread after the key in progress (if any) and waits for it.

    Args:
      timeout: seconds to wait for a `fn` call in progress; None waits.
    """
    self._finished = True
    self._stop.set()
    # Unblock a producer waiting on a full queue, and drop held results.
    while True:
      try:
        self._queue.get_nowait()
      except queue.Empty:
        break
    self._thread.join(timeout)

  @property
  def running(self) -> bool:
    """Whether the background thread is still alive."""
    return self._thread.is_alive()

  def __enter__(self) -> "Prefetcher[K, V]":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def __del__(self):
    # Never leave a thread computing for an abandoned iterator.
    stop = getattr(self, "_stop", None)
    if stop is not None:
      stop.set()
