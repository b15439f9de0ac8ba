"""Retrieval evaluation with trec_eval's own implementation (pytrec_eval)."""
