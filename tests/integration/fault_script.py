"""``megamt.train`` with a fault injected, for tests that check how a dying rank reports.

Launched like the module (``deepspeed --num_gpus 2 fault_script.py CONFIG overrides``).
``MEGAMT_TEST_RAISE=RANK:STEP`` makes rank RANK raise ``RuntimeError("injected fault ...")``
at the start of optimizer step STEP (1-based), as a bug in one rank would; every other rank
then meets a closed connection at its next collective.
"""

import os
import sys

from megamt import train, trainer

rank, step = (int(x) for x in os.environ["MEGAMT_TEST_RAISE"].split(":"))
_train_step = trainer.MultitaskTrainer.train_step


def train_step(self):
    if self.rank == rank and self.step + 1 == step:
        raise RuntimeError(f"injected fault on rank {rank} at step {step}")
    return _train_step(self)


trainer.MultitaskTrainer.train_step = train_step
sys.exit(train.main())
