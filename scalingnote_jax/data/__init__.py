"""Datasets: the built-in synthetic corpus (no download) and, later, BEIR / JSONL readers."""
