"""``megamt experiment groups``: which tasks should share a model.

The best partition of the tasks into K groups by total affinity inside the groups::

    score(partition) = sum over groups g, ordered pairs i != j in g of A[i][j]

``A[i][j]`` = the effect of task i on task j: the TAG affinity of one run (``Z[i -> j]``,
``RUN_DIR/affinity.json`` of a run with ``gradients.affinity_every``), or the pairwise
transfer matrix of ``megamt experiment pairs`` (``gain[j][i]``: j's metric trained with i,
minus alone). A task alone in its group contributes 0. The search is exhaustive over every
partition into exactly K non-empty groups for T <= 10 tasks (S(10, 5) = 42,525 partitions at
most) and branch-and-bound beyond (tasks assigned one by one; a branch is cut when its score
plus, for every pair with an unassigned task, ``max(0, A[i][j] + A[j][i])`` cannot beat the
best so far; exact).

With both matrices, each one's best partition is scored under the other too, ranked among
all partitions (T <= 10), and the two matrices are compared by Spearman's rank
correlation over the task pairs.

    megamt experiment groups --affinity runs/mt/ --pairs runs/pairs/ -k 2 -k 3 --out runs/groups
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path
from typing import Iterator

import numpy as np

EXHAUSTIVE_MAX_TASKS = 10


def partitions(n: int, k: int) -> Iterator[tuple[int, ...]]:
    """Every partition of ``range(n)`` into exactly ``k`` non-empty groups, once each, as a
    restricted growth string: ``labels[i]`` = group of task i, groups numbered by first task."""
    if not 1 <= k <= n:
        return
    labels = [0] * n

    def rec(i: int, used: int) -> Iterator[tuple[int, ...]]:
        if n - i < k - used:  # not enough tasks left to open the missing groups
            return
        if i == n:
            if used == k:
                yield tuple(labels)
            return
        for g in range(min(used + 1, k)):
            labels[i] = g
            yield from rec(i + 1, max(used, g + 1))

    yield from rec(0, 0)


def partition_score(A: np.ndarray, labels) -> float:
    labels = np.asarray(labels)
    same = labels[:, None] == labels[None, :]
    np.fill_diagonal(same, False)
    return float(A[same].sum())


def groups_of(labels, names: list[str]) -> list[list[str]]:
    out: dict[int, list[str]] = {}
    for name, g in zip(names, labels):
        out.setdefault(int(g), []).append(name)
    return [out[g] for g in sorted(out)]


def clean(A) -> np.ndarray:
    """The matrix as float64 with NaN entries (pairs never measured) as 0."""
    A = np.array(A, dtype=np.float64)
    return np.where(np.isfinite(A), A, 0.0)


def best_exhaustive(A: np.ndarray, k: int) -> tuple[float, tuple[int, ...], int]:
    best, arg, n = -np.inf, None, 0
    for labels in partitions(A.shape[0], k):
        n += 1
        s = partition_score(A, labels)
        if s > best + 1e-12:
            best, arg = s, labels
    return best, arg, n


def best_branch_and_bound(A: np.ndarray, k: int) -> tuple[float, tuple[int, ...], int]:
    """Exact: depth-first over task assignments, with an optimistic bound (see the module doc)."""
    T = A.shape[0]
    S = A + A.T  # an unordered pair in one group adds A[i][j] + A[j][i]
    order = list(np.argsort(-np.abs(S).sum(1)))  # strongly coupled tasks first: tighter bounds early
    gain_pos = np.maximum(S, 0.0)
    # optimistic remainder once the first p tasks (in `order`) are placed: every pair with a
    # task at position >= p adds its positive part
    rest = np.zeros(T + 1)
    for p in range(T - 1, -1, -1):
        t = order[p]
        rest[p] = rest[p + 1] + sum(gain_pos[t, order[q]] for q in range(p))
    labels = [-1] * T
    best = [-np.inf, None]
    nodes = [0]
    members: list[list[int]] = []

    def rec(p: int, score: float) -> None:
        nodes[0] += 1
        if T - p < k - len(members):
            return
        if p == T:
            if len(members) == k and score > best[0] + 1e-12:
                best[0], best[1] = score, tuple(labels)
            return
        if score + rest[p] <= best[0] + 1e-12:
            return
        t = order[p]
        options = [(score + sum(S[t, u] for u in g), gi) for gi, g in enumerate(members)]
        options.sort(reverse=True)
        for s, gi in options:
            members[gi].append(t)
            labels[t] = gi
            rec(p + 1, s)
            members[gi].pop()
        if len(members) < k:
            members.append([t])
            labels[t] = len(members) - 1
            rec(p + 1, score)
            members.pop()
        labels[t] = -1

    rec(0, 0.0)
    # canonical numbering (groups by first task), as the exhaustive search reports them
    relabel: dict[int, int] = {}
    canon = tuple(relabel.setdefault(g, len(relabel)) for g in best[1])
    return best[0], canon, nodes[0]


def best_partition(A, k: int, method: str = "auto") -> dict:
    """The best partition of the tasks into ``k`` groups: ``{score, labels, method, searched}``."""
    A = clean(A)
    T = A.shape[0]
    if not 1 <= k <= T:
        raise ValueError(f"k={k}: need 1 <= k <= {T} (the number of tasks)")
    if method == "auto":
        method = "exhaustive" if T <= EXHAUSTIVE_MAX_TASKS else "branch_and_bound"
    fn = best_exhaustive if method == "exhaustive" else best_branch_and_bound
    score, labels, searched = fn(A, k)
    return {"score": score, "labels": list(labels), "method": method, "searched": searched}


def rank_of(A, labels, k: int) -> tuple[int, int]:
    """(rank of this partition by score under ``A``: 1 = best, number of partitions); T <= 10."""
    A = clean(A)
    target = partition_score(A, labels)
    scores = [partition_score(A, p) for p in partitions(A.shape[0], k)]
    return 1 + sum(s > target + 1e-12 for s in scores), len(scores)


# --------------------------------------------------------------------------- inputs


def load_matrix(path: Path, kind: str = "lookahead") -> tuple[list[str], np.ndarray, str]:
    """(tasks, A with A[i][j] = effect of i on j, description) from a run folder /
    affinity.json (TAG) or a pairs folder / pairs.json (gains, transposed to that orientation)."""
    path = Path(path)
    for name in ("affinity.json", "pairs.json"):
        if path.is_dir() and (path / name).is_file():
            path = path / name
            break
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no affinity.json (a run with gradients.affinity_every) or pairs.json "
                                "(megamt experiment pairs) there")
    data = json.loads(path.read_text())
    if "gain" in data:
        gain = np.array([[np.nan if v is None else v for v in row] for row in data["gain"]], dtype=float)
        return list(data["tasks"]), gain.T, f"pairwise gains ({path})"
    section = data.get(kind) or {}
    if not section.get("steps"):
        raise ValueError(f"{path}: no {kind} affinity measured (steps: 0)")
    Z = np.array([[np.nan if v is None else v for v in row] for row in section["mean"]], dtype=float)
    return list(data["tasks"]), Z, f"TAG {kind} affinity ({path}, {section['steps']} steps)"


def align(names: list[str], A: np.ndarray, tasks: list[str]) -> np.ndarray:
    idx = [names.index(t) for t in tasks]
    return A[np.ix_(idx, idx)]


def compare(tasks, matrices: dict[str, np.ndarray], ks: list[int]) -> dict:
    from megamt.experiments.pairs import spearman

    out: dict = {"tasks": tasks, "k": {}}
    for k in ks:
        per = {}
        for label, A in matrices.items():
            res = best_partition(A, k)
            res["groups"] = groups_of(res["labels"], tasks)
            res["scored_under"] = {}
            for other, B in matrices.items():
                entry = {"score": partition_score(clean(B), res["labels"])}
                if other != label and len(tasks) <= EXHAUSTIVE_MAX_TASKS:
                    entry["rank"], entry["of"] = rank_of(B, res["labels"], k)
                res["scored_under"][other] = entry
            per[label] = res
        out["k"][k] = per
    if len(matrices) == 2:
        (la, A), (lb, B) = matrices.items()
        sa = [A[i, j] + A[j, i] for i, j in itertools.combinations(range(len(tasks)), 2)]
        sb = [B[i, j] + B[j, i] for i, j in itertools.combinations(range(len(tasks)), 2)]
        out["spearman_pairs"] = spearman(sa, sb)
        out["spearman_note"] = f"over the {len(sa)} task pairs, A[i][j] + A[j][i] of {la} vs {lb}"
    return out


def markdown(result: dict, descriptions: dict[str, str]) -> str:
    lines = ["# Task groupings", "", "Score = sum over groups of the affinity between ordered pairs of tasks in the "
             "same group (A[i][j] = effect of task i on task j).", ""]
    for label, d in descriptions.items():
        lines.append(f"- {label}: {d}")
    for k, per in result["k"].items():
        lines += ["", f"## {k} groups", "", "| matrix | best partition | score | searched | "
                  + " | ".join(f"under {m}" for m in descriptions) + " |", "|---|---|---:|---|" + "---|" * len(descriptions)]
        for label, r in per.items():
            cells = []
            for m in descriptions:
                e = r["scored_under"][m]
                cells.append(f"{e['score']:.4g}" + (f" (rank {e['rank']} of {e['of']})" if "rank" in e else ""))
            groups = " / ".join("{" + ", ".join(g) + "}" for g in r["groups"])
            lines.append(f"| {label} | {groups} | {r['score']:.4g} | {r['method']}, {r['searched']:,} | "
                         + " | ".join(cells) + " |")
    if "spearman_pairs" in result:
        lines += ["", f"Spearman's rank correlation of the two matrices: {result['spearman_pairs']:.3f} "
                  f"({result['spearman_note']})."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="megamt experiment groups", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--affinity", help="a run folder with affinity.json (or the file)")
    ap.add_argument("--kind", default="lookahead", choices=["lookahead", "first_order"],
                    help="which affinity of the run (default: lookahead)")
    ap.add_argument("--pairs", help="a `megamt experiment pairs` output folder (or its pairs.json)")
    ap.add_argument("-k", "--groups", type=int, action="append", required=True, help="number of groups (repeatable)")
    ap.add_argument("--tasks", nargs="*", help="only these tasks (default: those in every matrix given)")
    ap.add_argument("--out", help="folder for groups.md / groups.json (default: print only)")
    args = ap.parse_args(argv)
    if not args.affinity and not args.pairs:
        ap.error("give --affinity RUN_DIR and/or --pairs PAIRS_DIR")
    loaded = {}
    try:
        if args.affinity:
            loaded["affinity"] = load_matrix(Path(args.affinity), args.kind)
        if args.pairs:
            loaded["pairs"] = load_matrix(Path(args.pairs))
    except (FileNotFoundError, ValueError) as e:
        print(f"megamt experiment groups: {e}", file=sys.stderr)
        return 2
    common = [t for t in next(iter(loaded.values()))[0] if all(t in names for names, _, _ in loaded.values())]
    tasks = args.tasks or common
    missing = [t for t in tasks if t not in common]
    bad_k = [k for k in args.groups if not 1 <= k <= len(tasks)]
    if missing or bad_k or len(tasks) < 2:
        print(f"megamt experiment groups: tasks {tasks} (unknown to a matrix: {missing}); k {args.groups} must be "
              f"between 1 and {len(tasks)}", file=sys.stderr)
        return 2
    matrices = {label: align(names, A, tasks) for label, (names, A, _) in loaded.items()}
    result = compare(tasks, matrices, sorted(set(args.groups)))
    md = markdown(result, {label: d for label, (_, _, d) in loaded.items()})
    print(md, end="")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "groups.md").write_text(md)
        from megamt.experiments.pairs import json_safe

        (out / "groups.json").write_text(json.dumps(json_safe(result), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
