"""``megamt experiment <kind> ...``: the experiments that launch training runs.

    megamt experiment run EXPERIMENT.yaml      a list / grid of overrides, one run each (resumable)
    megamt experiment pairs SPEC               the pairwise transfer matrix of T tasks
    megamt experiment groups --affinity RUN_DIR --pairs OUT -k 2   task groupings by affinity
    megamt experiment transfer SPEC            single-task vs multitask models
"""

from __future__ import annotations

import importlib
import sys

KINDS = {
    "run": ("megamt.experiments.runner", "a base config plus a list or grid of overrides, one run each"),
    "pairs": ("megamt.experiments.pairs", "every task alone and every pair: the T x T transfer matrix"),
    "groups": ("megamt.experiments.groups", "best partition of the tasks into K groups by affinity"),
    "transfer": ("megamt.experiments.transfer", "single-task vs multitask models, positive/negative transfer"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in KINDS:
        width = max(map(len, KINDS))
        text = "usage: megamt experiment <kind> [args...]\n\nkinds:\n" + "\n".join(
            f"  {k:<{width}}  {h}" for k, (_, h) in KINDS.items()) + "\n\n`megamt experiment <kind> --help` for its options."
        if argv and argv[0] not in ("-h", "--help"):
            print(f"megamt experiment: unknown kind {argv[0]!r}\n\n{text}", file=sys.stderr)
            return 2
        print(text)
        return 0
    module = importlib.import_module(KINDS[argv[0]][0])
    if argv[0] == "transfer":  # its parser takes the kind as its first argument
        return int(module.main(argv) or 0)
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
