"""Every PRNG stream of a run, in one place.

A run's root key (`jax.random.key(seed)`, folded with the run's release
identity; simulation.stream_keys) is split into independent streams by
folding in these constants, and round r folds r into its stream (so a
resumed run replays the same randomness). Two streams never share a
constant at the same level, so no two released quantities share noise.
"""

# Folded into a run's root key.
INIT = 0  # the model's initial parameters (seed alone)
SAMPLE = 1  # round r's cohort: sampler.sample_round(sample, r)
NOISE = 2  # round r's noise key: fold_in(noise, r)
DATA = 3  # round r's example order: fold_in(data, r), host and device
DROPOUT = 4  # simulated dropout (host NumPy words)
CANARY = 5  # audit canaries' directions (seed alone)

# Folded into the noise stream: the root of correlated noise's keys (DP-FTRL
# tree nodes, matrix-factorization steps; far above any round index, which
# is folded into the same stream).
CORRELATED = 1 << 30

# Folded into round r's noise key: sub-streams of the round's noise. The
# round's key itself is only their parent; no noise is drawn from it.
CENTRAL_NOISE = 0  # the server's noise on the clipped sum
COUNT_NOISE = 1  # adaptive clipping's noisy count
CLIENT_NOISE = 2  # client-side noise, then fold_in(slot)
EXAMPLE_NOISE = 3  # record-level DP-SGD inside a client, then fold_in(slot)
