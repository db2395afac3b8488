"""Federated data: populations, cohort blocks, datasets and their loaders.

Modules, each importing only those listed before it:

  `population`: `FederatedPopulation`, clients and their examples in memory.
  `source`: `ClientSource`, the read interface of in-memory and lazy clients.
  `dataset`: `FederatedDataset`, training plus held-out clients, the type
    every loader returns.
  `partition`, `synthetic`: split arrays over clients; FedProx's Synthetic.
  `fraud`, `iot`: generated transactions of banks (fraud detection) and
    sensor windows of devices (activity recognition).
  `in_memory`: a dataset from the user's own arrays or clients.
  `formats`: readers of federated data files (TFF, FedJAX, LEAF).
  `files`, `shakespeare`: loaders of a data file and of Shakespeare's plays.
  `builtin`: the registry of named datasets, `load(name, ...)`.
  `blocks`, `prefetch`: padded cohort blocks for the device, and a
    background loader of the next ones.

Nothing here depends on the rest of `fedjax_dp`.
"""
