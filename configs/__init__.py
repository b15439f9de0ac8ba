"""Experiment configs, shipped in the wheel as `scalingnote_jax.configs` (scalingnote_jax/config.py finds them by name)."""
