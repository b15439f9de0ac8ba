"""Scaling laws: fitted power laws over sweeps of model size N and data size D, with forecast checks."""
