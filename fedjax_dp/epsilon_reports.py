"""The epsilons a run reports, computed ahead on a worker thread.

A round's DP event is recorded in the ledger before the round runs; that is
what keeps the run accounted. Turning the recorded events into an epsilon is
a separate, slower step (a PLD composition takes 10-100 ms on a CPU, more
than a small model's round), needed only where an epsilon is shown: at
evaluation rounds and at the end. The events of future rounds are known in
advance (they depend on the privacy plan only), so a worker thread computes
those epsilons while earlier rounds run, from a shadow ledger that records
the plan's events in the same order as the run's ledger does (so it reports
the same numbers, bit for bit).
"""

import collections
import concurrent.futures
import os
import threading
from typing import Callable, Iterator

from fedjax_dp.privacy import accounting
from fedjax_dp.privacy import plan as plan_lib

# How many report rounds ahead of the loop the worker may be: enough that
# it starts on them while the first round compiles (a run that stops early
# cancels the ones not started).
LOOKAHEAD = 64


def is_report_round(r: int, num_rounds: int, every: int) -> bool:
  """Whether round r's row carries an epsilon: every `every`-th round and
  the last of `num_rounds`."""
  return (r + 1) % every == 0 or r + 1 == num_rounds


def report_rounds(first_round: int, num_rounds: int,
                  every: int) -> Iterator[int]:
  """The report rounds (`is_report_round`) from `first_round` on."""
  for r in range(first_round, num_rounds):
    if is_report_round(r, num_rounds, every):
      yield r


def ledger_after(plan: plan_lib.PrivacyPlan, ledger: accounting.PrivacyLedger,
                 num_rounds: int) -> accounting.PrivacyLedger:
  """A copy of `ledger` (holding rounds 0..k-1) with the plan's events of
  rounds k..num_rounds-1 recorded after them."""
  shadow = ledger.first(ledger.num_rounds)
  for r in range(ledger.num_rounds, num_rounds):
    shadow.record(r, plan.event(r))
  return shadow


def rounds_within_budget(plan: plan_lib.PrivacyPlan,
                         ledger: accounting.PrivacyLedger, num_rounds: int,
                         budget: float) -> int:
  """How many rounds (at most `num_rounds`) a run that has recorded
  `ledger` may run without the ledger's epsilon exceeding `budget`.

  The epsilon of the first t rounds grows with t (a longer composition is
  a post-processing of no shorter one's release), so the search is a
  bisection; the answer's epsilon is checked, never assumed.
  """
  def eps(t):
    return ledger_after(plan, ledger, t).epsilon()

  if eps(num_rounds) <= budget:
    return num_rounds
  lo, hi = ledger.num_rounds, num_rounds  # eps(hi) > budget
  while hi - lo > 1:
    mid = (lo + hi) // 2
    if eps(mid) <= budget:
      lo = mid
    else:
      hi = mid
  return lo


class EpsilonReports:
  """The ledger's epsilon (and the example-level one) after each report
  round, computed ahead by one worker thread.

  Args:
    plan: the run's privacy plan (it gives every future round's event).
    ledger: the run's ledger before its first round to run (empty, or
      restored on resume); not modified.
    rounds: report rounds (0-based, increasing): `epsilon_after(r)` may be
      asked for these only.
  """

  def __init__(self, plan: plan_lib.PrivacyPlan,
               ledger: accounting.PrivacyLedger, rounds: Iterator[int]):
    self._plan = plan
    self._shadow = ledger.first(ledger.num_rounds)
    self._rounds = iter(rounds)
    self._pending = collections.deque()
    self._executor = concurrent.futures.ThreadPoolExecutor(
        1, thread_name_prefix="fedjax_dp-epsilon",
        initializer=_lower_priority)
    for _ in range(LOOKAHEAD):
      self._submit_next()

  def _submit_next(self) -> None:
    r = next(self._rounds, None)
    if r is None:
      return
    for q in range(self._shadow.num_rounds, r + 1):
      self._shadow.record(q, self._plan.event(q))
    epsilon = self._shadow.frozen_epsilon()
    num_rounds = r + 1
    example = lambda: self._plan.example_epsilon(num_rounds)
    self._pending.append(
        (r, self._executor.submit(_both, epsilon, example)))

  def epsilon_after(self, r: int) -> tuple[float, float | None]:
    """(epsilon, example-level epsilon or None) after report round r."""
    while self._pending and self._pending[0][0] < r:
      self._pending.popleft()
      self._submit_next()
    if not self._pending or self._pending[0][0] != r:
      raise ValueError(f"round {r} is not a report round")
    _, future = self._pending.popleft()
    self._submit_next()
    return future.result()

  def close(self) -> None:
    """Stops the worker; epsilons not yet started are not computed."""
    self._executor.shutdown(wait=False, cancel_futures=True)


def _lower_priority() -> None:
  """Runs this (worker) thread below the rounds' threads: where the device
  is the CPU, the rounds go first and the worker takes the idle time."""
  try:
    # On Linux a thread's id names it alone: this thread gets nice 10.
    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
  except (AttributeError, OSError):  # another OS: the default priority
    pass


def _both(epsilon: Callable[[], float],
          example: Callable[[], float | None]):
  return epsilon(), example()
