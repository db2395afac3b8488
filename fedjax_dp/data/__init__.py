"""Federated data: populations, cohort blocks, built-in datasets."""
