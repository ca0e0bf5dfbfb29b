"""Evaluation: the metrics the paper reports (metrics.py)."""
