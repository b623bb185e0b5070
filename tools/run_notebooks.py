"""Execute the tutorial notebooks top to bottom: ``python tools/run_notebooks.py [--store] [NAME ...]``.

Each notebook runs from a temporary copy in a scratch folder, with ``MEGAMT_TUTORIAL_OUT``
pointing its outputs (corpus, shards, runs, plots) there, so running it never changes the
checkout. ``--store`` writes the executed copy (with its outputs) back into ``notebooks/``:
that is how the stored outputs are refreshed after a change. ``make test`` runs the same
function (tests/integration/test_tutorials.py) and fails on any cell error.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"


def execute(notebook: Path, workdir: Path, timeout_s: int = 600, env: dict | None = None):
    """Run a copy of ``notebook`` in ``workdir`` (its outputs go to ``workdir/out``) with this
    interpreter's kernel; returns the executed ``NotebookNode``. A cell error raises
    ``nbclient.exceptions.CellExecutionError`` naming the cell and the traceback."""
    import nbformat
    from nbclient import NotebookClient

    workdir.mkdir(parents=True, exist_ok=True)
    copy = workdir / notebook.name
    shutil.copyfile(notebook, copy)
    nb = nbformat.read(copy, as_version=4)
    saved = {k: os.environ.get(k) for k in ("MEGAMT_TUTORIAL_OUT",)}
    # the kernel inherits this process's environment
    os.environ["MEGAMT_TUTORIAL_OUT"] = str(workdir / "out")
    os.environ.update(env or {})
    try:
        # kernel "python3" = ipykernel's native kernel: the interpreter running this
        NotebookClient(nb, timeout=timeout_s, kernel_name="python3",
                       resources={"metadata": {"path": str(workdir)}}).execute()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    nbformat.write(nb, copy)
    return nb


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", help="notebook file names (default: every notebooks/*.ipynb)")
    ap.add_argument("--store", action="store_true", help="write the executed notebooks back into notebooks/")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per cell")
    args = ap.parse_args(argv)
    import nbformat

    paths = [NOTEBOOKS / n for n in args.names] if args.names else sorted(NOTEBOOKS.glob("*.ipynb"))
    scratch = Path(tempfile.mkdtemp(prefix="megamt-notebooks-"))
    for path in paths:
        t0 = time.time()
        nb = execute(path, scratch / path.stem, args.timeout)
        print(f"{path.name}: executed in {time.time() - t0:.0f} s ({scratch / path.stem})", flush=True)
        if args.store:
            for cell in nb.cells:  # no kernel timing metadata in the stored file
                cell.get("metadata", {}).pop("execution", None)
            nbformat.write(nb, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
