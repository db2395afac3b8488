#!/usr/bin/env python
"""How close workload B's round can get to its FLOP bound on this backend.

Workload B (scripts/benchmark.py) trains the McMahan CNN on 100 clients of
20 examples, 2 local steps of batch 10. Its FLOP bound counts every FLOP at
the machine's matmul peak. This script times, alone and in the layout the
round runs them (batch 10, as many independent clients side by side as
cores), each convolution the round must run per client step:

  conv1 forward, conv1 weight gradient (its input gradient is not needed),
  conv2 forward, conv2 input gradient, conv2 weight gradient,

(`models/conv_ops.py`'s forms, the ones the round uses, and the same
convolutions as im2col + one matmul), and the same operations on one batch
of 1,000 examples (the most a shape that shares work across clients could
give them). It prints each one's rate against the matmul peak measured in
the same process, and the *kernel floor*: the round's convolutions at their
measured rates (each by its faster form) plus its dense FLOPs at the matmul
peak, with nothing else (no pooling, ReLU, layout, clipping or noise) -- a
lower bound on any round built from these kernels, as a multiple of the
FLOP bound.

  python scripts/conv_floor.py            # about a minute on 2 cores
"""

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_dp.models import conv_ops

CLIENTS, EXAMPLES, BATCH, STEPS = 100, 20, 10, 2
PAD = ((2, 2), (2, 2))
# Per example, multiply-adds: conv1 28x28x32 outputs of 5x5x1, conv2
# 14x14x64 outputs of 5x5x32, dense 3136x512 + 512x62.
MACS = {"conv1": 28 * 28 * 32 * 25, "conv2": 14 * 14 * 64 * 25 * 32,
        "dense": 3136 * 512 + 512 * 62}


def _cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def _time(fn, *args, reps: int) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  # The fastest repetition: other work on the machine only ever slows one
  # down, and a floor wants each kernel at its best.
  return min(times)


def matmul_peak(n: int = 4096, reps: int = 5) -> float:
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda a, b: a @ b)
  return 2 * n ** 3 / _time(f, a, a, reps=reps)


def _patches(x):
  """im2col: [n, h, w, c] -> [n * h * w, c * 25] (features ordered c, kh,
  kw, as `conv_general_dilated_patches` gives them)."""
  p = jax.lax.conv_general_dilated_patches(
      x, (5, 5), (1, 1), PAD, dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return p.reshape((-1, p.shape[-1]))


def _as_matrix(k):
  """HWIO kernel -> [c * 25, o], rows in `_patches`' order."""
  return jnp.transpose(k, (2, 0, 1, 3)).reshape((-1, k.shape[-1]))


def _im2col_forward(x, k, dy):
  return (_patches(x) @ _as_matrix(k)).reshape(dy.shape)


def _im2col_weight_gradient(x, k, dy):
  g = _patches(x).T @ dy.reshape((-1, dy.shape[-1]))
  c, o = k.shape[2], k.shape[3]
  return jnp.transpose(g.reshape((c, 5, 5, o)), (1, 2, 0, 3))


def _im2col_input_gradient(x, k, dy):
  flipped = jnp.transpose(k[::-1, ::-1], (0, 1, 3, 2))
  return (_patches(dy) @ _as_matrix(flipped)).reshape(x.shape)


# Other ways to compute the same convolutions (im2col + one matmul); the
# floor takes the faster way of each.
ALTERNATIVES = {
    "conv1 forward": _im2col_forward,
    "conv1 weight gradient": _im2col_weight_gradient,
    "conv2 forward": _im2col_forward,
    "conv2 input gradient": _im2col_input_gradient,
    "conv2 weight gradient": _im2col_weight_gradient,
}


def _ops():
  """name -> (fn(x, k, dy), layer): one convolution of the round."""
  return {
      "conv1 forward": (lambda x, k, dy: conv_ops._conv(  # pylint: disable=protected-access
          x, k, PAD, None), "conv1"),
      "conv1 weight gradient": (lambda x, k, dy: conv_ops._kernel_gradient(  # pylint: disable=protected-access
          x, dy, PAD, None), "conv1"),
      "conv2 forward": (lambda x, k, dy: conv_ops._conv(  # pylint: disable=protected-access
          x, k, PAD, None), "conv2"),
      "conv2 input gradient": (lambda x, k, dy: conv_ops._input_gradient(  # pylint: disable=protected-access
          dy, k, PAD, None), "conv2"),
      "conv2 weight gradient": (lambda x, k, dy: conv_ops._kernel_gradient(  # pylint: disable=protected-access
          x, dy, PAD, None), "conv2"),
  }


def _inputs(layer: str, batch: int, copies: int, key):
  h, cin, cout = (28, 1, 32) if layer == "conv1" else (14, 32, 64)
  k1, k2, k3 = jax.random.split(key, 3)
  x = jax.random.normal(k1, (copies, batch, h, h, cin))
  k = jax.random.normal(k2, (copies, 5, 5, cin, cout))
  dy = jax.random.normal(k3, (copies, batch, h, h, cout))
  return x, k, dy


def measure(reps: int) -> dict:
  cores = _cores()
  peak = matmul_peak()
  rows = {}
  key = jax.random.key(0)
  for name, (op, layer) in _ops().items():
    flops_one = 2 * MACS[layer]  # per example, one of the three passes
    out = {}
    for label, batch, copies in (("batch 10", BATCH, cores),
                                 ("batch 1000", 1000, 1)):
      x, k, dy = _inputs(layer, batch, copies, key)

      # Independent copies traced side by side, as the round traces its
      # chunk's clients: XLA runs them concurrently on the cores.
      def run(x, k, dy, op=op, copies=copies):
        return [op(x[i], k[i], dy[i]) for i in range(copies)]

      def run_im2col(x, k, dy, op=ALTERNATIVES[name], copies=copies):
        return [op(x[i], k[i], dy[i]) for i in range(copies)]

      for form, fn in (("", run), (" im2col", run_im2col)):
        seconds = _time(jax.jit(fn), x, k, dy, reps=reps)
        rate = flops_one * batch * copies / seconds
        out[label + form] = {"seconds": seconds, "gflops": rate / 1e9,
                             "of_peak": rate / peak}
      a, b = out[label], out[label + " im2col"]
      np.testing.assert_allclose(
          np.asarray(jax.jit(run)(x, k, dy)[0]),
          np.asarray(jax.jit(run_im2col)(x, k, dy)[0]), rtol=2e-3, atol=2e-3)
      out[label + " best"] = a if a["gflops"] >= b["gflops"] else b
    rows[name] = {"layer": layer, **out}
  # Measured again after the convolutions; the higher is the machine's.
  peak = max(peak, matmul_peak())
  for row in rows.values():
    for cell in row.values():
      if isinstance(cell, dict):
        cell["of_peak"] = cell["gflops"] * 1e9 / peak
  # The round: every client step runs each operation once on its batch.
  examples = CLIENTS * EXAMPLES  # STEPS x BATCH per client
  bound = 6 * sum(MACS.values()) * examples / peak
  floor = {}
  for label in ("batch 10", "batch 10 best", "batch 1000 best"):
    conv_s = sum(2 * MACS[r["layer"]] * examples / (r[label]["gflops"] * 1e9)
                 for r in rows.values())
    dense_s = 6 * MACS["dense"] * examples / peak
    floor[label] = {"conv_s": conv_s, "dense_s": dense_s,
                    "floor_s": conv_s + dense_s,
                    "x_flop_bound": (conv_s + dense_s) / bound}
  return {"cores": cores, "matmul_peak_gflops": peak / 1e9,
          "flop_bound_s": bound, "ops": rows, "floor": floor,
          "backend": jax.default_backend(), "jax": jax.__version__}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--reps", type=int, default=20)
  p.add_argument("--json", action="store_true")
  args = p.parse_args()
  r = measure(args.reps)
  if args.json:
    print(json.dumps(r, indent=1))
    return
  print(f"{r['backend']}, {r['cores']} cores, JAX {r['jax']}: matmul peak "
        f"{r['matmul_peak_gflops']:.0f} GFLOP/s; B's FLOP bound "
        f"{r['flop_bound_s']:.3f} s")
  labels = ("batch 10", "batch 10 im2col", "batch 1000",
            "batch 1000 im2col")
  print(f"{'GFLOP/s (share of peak)':<24}" +
        "".join(f"{l:>20}" for l in labels))
  for name, row in r["ops"].items():
    print(f"{name:<24}" + "".join(
        f"{row[l]['gflops']:>12.0f} ({row[l]['of_peak']:4.0%})"
        for l in labels))
  for label, f in r["floor"].items():
    print(f"kernel floor at {label}: convolutions {f['conv_s']:.3f} s + "
          f"dense at peak {f['dense_s']:.3f} s = {f['floor_s']:.3f} s = "
          f"{f['x_flop_bound']:.2f}x the FLOP bound")


if __name__ == "__main__":
  main()
