"""Suite-wide settings.

``MEGAMT_STRICT_COLLECTIVES=1``: every tensor collective checks that its tensor was placed on
the backend's device through megamt.comm (the stand-in for NCCL, which refuses CPU tensors
when the model is on a GPU; gloo on CPU ranks would accept them). Set here, it reaches every
process the tests launch.
"""

import os

os.environ.setdefault("MEGAMT_STRICT_COLLECTIVES", "1")

import pytest

DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
            "CROSS_RANK", "CROSS_SIZE")


@pytest.fixture(autouse=True)
def _isolated_process_state():
    """A test that trains in this process (the experiments' ``inprocess`` launcher, a
    1-rank trainer) must not leave the next test its launcher variables (a subprocess would
    inherit a MASTER_PORT whose store is still listening) or transformers' global ZeRO-3
    config (models built afterwards would come out partitioned). Its process group stays:
    DeepSpeed caches its groups, and tests that need a fresh process spawn one."""
    before_env = {k: os.environ.get(k) for k in DIST_ENV}
    yield
    for k, v in before_env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    try:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config
    except ImportError:
        return
    unset_hf_deepspeed_config()
