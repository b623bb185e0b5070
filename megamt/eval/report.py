"""Evaluation output: ``eval.json``, a Markdown table beside it, TensorBoard scalars.

``eval.json``::

    {"family": "causal_lm", "world_size": 2,
     "tasks": {"sst2": {"task_type": "classification", "split": "validation",
                        "template": "cls_question", "n_examples": 872, "cut_generations": 0,
                        "metrics": {"accuracy": 91.2, "macro_f1": 91.1}, "zero_shot": false,
                        "supervised": {...}, "ratio": {...}}}}   # the last two for zero-shot tasks

The Markdown table has one row per task: its primary metric first, then the others,
and for zero-shot tasks the supervised score of the same task and the ratio.

With ``eval.all_templates`` a task's entry also holds ``per_template`` ({template:
metrics}) and ``template_spread`` ({metric: {std, min, max}}); ``metrics`` is the mean over
templates, shown as ``mean ± std`` with the range in the table, and TensorBoard gets
``eval/<task>/<metric>_template_std`` beside the mean.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from megamt.eval.metrics import METRICS_BY_TYPE


def _fmt(x) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return "nan" if math.isnan(x) else f"{x:.2f}"
    return str(x)


def markdown_table(results: dict) -> str:
    """One row per task (metrics on the 0-100 scale)."""
    lines = ["| task | type | split | n | template | primary | score | other metrics | cut gen. | zero-shot | "
             "supervised | ratio |",
             "|---|---|---|---:|---|---|---:|---|---:|---|---:|---:|"]
    for name, e in results["tasks"].items():
        mets = e.get("metrics", {})
        if not mets:
            continue
        order = [m for m in METRICS_BY_TYPE[e["task_type"]] if m in mets]
        primary = order[0]
        others = ", ".join(f"{m} {_fmt(mets[m])}" for m in order[1:])
        sup = e.get("supervised", {}).get(primary)
        ratio = e.get("ratio", {}).get(primary)
        score, template = _fmt(mets[primary]), e["template"]
        spread = e.get("template_spread", {}).get(primary)
        if spread is not None:
            score += f" ± {_fmt(spread['std'])}"
            template += f" ({primary} {_fmt(spread['min'])}–{_fmt(spread['max'])})"
        lines.append(f"| {name} | {e['task_type']} | {e['split']} | {e.get('n_examples', '–')} | {template} | "
                     f"{primary} | {score} | {others or '–'} | {e.get('cut_generations', 0)} | "
                     f"{'yes' if e.get('zero_shot') else 'no'} | {_fmt(sup)} | "
                     f"{'–' if ratio is None else _fmt(ratio)} |")
    return "\n".join(lines) + "\n"


def write_report(results: dict, out_dir: str | Path, print_table: bool = True) -> tuple[Path, Path]:
    """Write ``eval.json`` and ``eval.md`` into ``out_dir`` (and print the table)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    js = out / "eval.json"
    js.write_text(json.dumps(results, indent=1, sort_keys=False) + "\n")
    table = markdown_table(results)
    md = out / "eval.md"
    md.write_text("# Evaluation\n\n" + table)
    if print_table:
        print(table, end="")
    return js, md


def log_eval(writer, step: int, results: dict) -> int:
    """``eval/<task>/<metric>`` scalars at ``step`` into a TensorBoard ``SummaryWriter``.

    Returns the number of scalars written. ``writer`` may be None (non-zero ranks): no-op.
    """
    if writer is None:
        return 0
    n = 0
    for task, e in results.get("tasks", {}).items():
        for metric, value in e.get("metrics", {}).items():
            writer.add_scalar(f"eval/{task}/{metric}", float(value), step)
            n += 1
        for metric, spread in e.get("template_spread", {}).items():
            writer.add_scalar(f"eval/{task}/{metric}_template_std", float(spread["std"]), step)
            n += 1
        for metric, value in e.get("ratio", {}).items():
            writer.add_scalar(f"eval/{task}/{metric}_zero_shot_ratio", float(value), step)
            n += 1
    writer.flush()
    return n
