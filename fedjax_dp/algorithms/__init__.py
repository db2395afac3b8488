"""Federated algorithms built from the client, privacy and server parts."""
