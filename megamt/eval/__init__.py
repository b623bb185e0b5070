"""Evaluation: per-task metrics, generation / rank classification, reports, transfer experiments."""
