"""fedjax-dp: federated learning with differential privacy on JAX."""

__version__ = "0.1.0"
