"""Experiments: everything that launches training runs (transfer, runner, pairs, HPO, affinity
groups, reports). The top layer below the CLI: it may import the trainer and evaluation; the
trainer, evaluation and everything below never import it."""
