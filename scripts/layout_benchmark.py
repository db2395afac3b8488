#!/usr/bin/env python
"""Round layouts of `dp_fedavg.build_round` compared on any registered model.

The fixed workloads of `scripts/benchmark.py` cover the 2NN and the CNN.
This script checks the CPU default layout (chunks of as many clients as
cores, traced as independent copies) against the previous default (one
client per chunk, vmapped) on the other models, in one process, on the same
synthetic cohort (40 clients, 2 local steps of batch 8, lr 0.1, clip 1,
noise 1). It prints compile time and the median of 3 rounds per layout, and
each layout's speed-up over the first.

  python scripts/layout_benchmark.py --models gru_lm,transformer_lm
"""

import argparse
import statistics
import time

import jax
import numpy as np

from fedjax_dp import client as client_lib
from fedjax_dp import server as server_lib
from fedjax_dp.algorithms import dp_fedavg
from fedjax_dp.models import registry
from fedjax_dp.data import blocks

CLIENTS, STEPS, BATCH = 40, 2, 8
SEQ_LEN, VOCAB = 80, 86  # Shakespeare-like next-character prediction
IMAGE, CLASSES = (28, 28, 1), 62
LAYOUTS = ((1, True), (2, False), (4, False))  # (clients per chunk, vmap)


def _block(name: str, rng: np.random.Generator):
  lead = (CLIENTS, STEPS, BATCH)
  if name in ("gru_lm", "transformer_lm"):
    x = rng.integers(0, VOCAB, lead + (SEQ_LEN,)).astype(np.int32)
    y = rng.integers(0, VOCAB, lead + (SEQ_LEN,)).astype(np.int32)
    model = registry.get_model(name, (SEQ_LEN,), VOCAB)
  else:
    x = rng.normal(size=lead + IMAGE).astype(np.float32)
    y = rng.integers(0, CLASSES, lead).astype(np.int32)
    model = registry.get_model(name, IMAGE, CLASSES)
  block = blocks.ClientBlock({"x": x, "y": y}, np.ones(lead, bool),
                                np.ones((CLIENTS,), bool))
  return model, block


def measure(name: str) -> None:
  model, block = _block(name, np.random.default_rng(0))
  server_opt = server_lib.server_optimizer("sgd")
  state = server_lib.init(model.init(jax.random.key(0)), server_opt)
  hparams = dp_fedavg.RoundHparams.create(
      client_lr=0.1, server_lr=1.0, clip_norm=1.0, noise_multiplier=1.0,
      denominator=CLIENTS)
  first = None
  for chunk, vmap in LAYOUTS:
    fn = jax.jit(dp_fedavg.build_round(
        model, client_lib.client_optimizer("sgd"), server_opt,
        clients_per_chunk=chunk, vmap_clients=vmap, unroll_local_steps=True))
    t0 = time.perf_counter()
    compiled = fn.lower(state, block, hparams, jax.random.key(1)).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(state, block, hparams, jax.random.key(1)))
    times = []
    for r in range(3):
      t0 = time.perf_counter()
      jax.block_until_ready(compiled(state, block, hparams,
                                     jax.random.key(r)))
      times.append(time.perf_counter() - t0)
    s = statistics.median(times)
    first = first or s
    print(f"{name:15s} chunk {chunk} {'vmap ' if vmap else 'indep'}  "
          f"compile {compile_s:5.1f} s  round {s:.3f} s  "
          f"speed-up {first / s:.2f}x", flush=True)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--models", default="gru_lm,transformer_lm")
  for name in p.parse_args().models.split(","):
    measure(name.strip())


if __name__ == "__main__":
  main()
