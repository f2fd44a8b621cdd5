"""Evaluation stage: inference in original geometry, metrics, reports."""
