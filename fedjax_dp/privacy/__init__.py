"""Every privacy-critical line of fedjax-dp.

`plan.py` is the one joint: from a run's config it builds the sampler, the
clip, the noise and its placement, the neighbouring relation, the public
denominator, the (calibrated) noise multiplier and every round's DP event.
The other modules are flat pieces it joins: `clipping`, `noise`, `laplace`,
`placement`, `secure_aggregation`, `tree_aggregation`, `adaptive_clipping`,
`per_layer`, `sampling`, `events`, and on the host `accounting` (the
ledger), `ledger_codec` and `tuning`.
"""
