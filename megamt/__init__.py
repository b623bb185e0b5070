"""megamt: multitask fine-tuning of large language models.

The public Python API (imported lazily, so ``import megamt`` and the CLI stay fast)::

    from megamt import MultitaskConfig, TaskConfig, MultitaskModel, MultitaskTrainer
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "MultitaskConfig": "megamt.config",
    "TaskConfig": "megamt.config",
    "InputConfig": "megamt.config",
    "load_config": "megamt.config",
    "ConfigError": "megamt.config",
    "MultitaskModel": "megamt.model",
    "MultitaskTrainer": "megamt.trainer",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'megamt' has no attribute {name!r}")
