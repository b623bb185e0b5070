"""megamt's input side: read → template → tokenize → shards → streams → mixture → pack.

Public API (imported lazily so ``import megamt.data`` stays light)::

    from megamt.data import (read_examples, render, build_shards, load_manifest,
                             TrainPipeline, eval_batches, make_demo_assets)
"""

from __future__ import annotations

_LAZY = {
    "DataError": "megamt.data.errors",
    "SkipCounter": "megamt.data.errors",
    "Example": "megamt.data.formats",
    "read_examples": "megamt.data.formats",
    "resolve_labels": "megamt.data.formats",
    "render": "megamt.data.templates",
    "register_template": "megamt.data.templates",
    "parse_ner_target": "megamt.data.templates",
    "load_tokenizer": "megamt.data.tokenize",
    "build_shards": "megamt.data.shards",
    "load_manifest": "megamt.data.shards",
    "check_tokenizer": "megamt.data.shards",
    "read_shard": "megamt.data.shards",
    "TaskStream": "megamt.data.streams",
    "TaskMixture": "megamt.data.mixture",
    "Packer": "megamt.data.packing",
    "collate_rows": "megamt.data.packing",
    "TrainPipeline": "megamt.data.pipeline",
    "eval_batches": "megamt.data.pipeline",
    "padding_batch": "megamt.data.pipeline",
    "make_demo_assets": "megamt.data.synthetic",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'megamt.data' has no attribute {name!r}")
