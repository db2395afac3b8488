"""Readers and writers for the standard federated benchmark file formats.

Each module reads one on-disk layout from a local path, without TensorFlow:

  `tff_hdf5`: TensorFlow Federated HDF5 (EMNIST, Shakespeare, StackOverflow,
    CIFAR-100 as TFF distributes them).
  `tff_sqlite`: TensorFlow Federated SQLite (rows of serialized
    `tf.train.Example` protos).
  `fedjax_sqlite`: FedJAX SQLite (zlib-compressed msgpack per client).
  `leaf_json`: LEAF JSON files (FEMNIST, Shakespeare, Sent140, Synthetic).
  `detect`: format detection, `open_source` and `inspect` for any of them.

Large formats open as lazy `source.ClientSource`s; every problem with a file
(missing, truncated, wrong layout) raises `FormatError` naming the file.
"""

from fedjax_dp.data.formats import common

FormatError = common.FormatError
