"""Evaluation: zero-shot classification, linear probes, retrieval, and their metrics."""
