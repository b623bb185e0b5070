"""Run under ``deepspeed --num_gpus 2``: several ``megamt.train`` runs one after another in ONE
launch (the launcher, imports and process-group set-up paid once). ``argv``: the config, then
runs separated by ``--``, each a list of ``section.key=value`` overrides (optionally starting
with ``--resume``)."""

import sys

from megamt import comm
from megamt.train import main

if __name__ == "__main__":
    # every run shares the launch's process group: leave it once, after the last run, not after each
    leave, comm.leave = comm.leave, lambda barrier_first=True: None
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    config, rest = args[0], args[1:]
    runs, cur = [], []
    for a in rest:
        if a == "--":
            runs.append(cur)
            cur = []
        else:
            cur.append(a)
    runs.append(cur)
    for overrides in runs:
        rc = main([config, *overrides])
        if rc:
            sys.exit(rc)
    leave()
