"""Evaluation: per-task metrics, generation / rank classification, reports (experiments that launch runs live in megamt.experiments)."""
