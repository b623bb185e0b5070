"""tools/bench_mixing.py: the derived data it builds (the SQuAD-based multiple-choice task,
the dev splits) and the report it reads off a transfer experiment, on tiny stand-in files."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[2] / "tools"


def _load():
    sys.path.insert(0, str(TOOLS))
    spec = importlib.util.spec_from_file_location("bench_mixing", TOOLS / "bench_mixing.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def squad_doc(answers_per_article):
    data = []
    for a, answers in enumerate(answers_per_article):
        paras = [{"context": " ".join(answers), "qas": [
            {"id": f"{a}-{p}-{q}", "question": f"Question {a}.{p}.{q}?",
             "answers": [{"text": ans, "answer_start": " ".join(answers).index(ans)}]}
            for q, ans in enumerate(answers[p::2])]} for p in range(2)]
        data.append({"title": f"A{a}", "paragraphs": paras})
    return {"data": data, "version": "1.1"}


def test_squad_multiple_choice_and_splits(tmp_path):
    bench = _load()
    src = tmp_path / "squad.json"
    src.write_text(json.dumps(squad_doc([["Denver Broncos", "the Denver Broncos", "Santa Clara", "2016", "gold",
                                          "Levi's Stadium"], ["Warsaw", "Vistula", "1596", "Chopin"]])))
    paths = bench.split_squad(src, tmp_path)
    counts = {s: sum(len(p["qas"]) for a in json.loads(f.read_text())["data"] for p in a["paragraphs"])
              for s, f in paths.items()}
    assert counts == {"train": 6, "validation": 2, "dev": 2}
    mc = bench.squad_multiple_choice(paths["train"], tmp_path / "mc.jsonl")
    rows = [json.loads(l) for l in mc.read_text().splitlines()]
    assert len(rows) == 6 and rows == [json.loads(l) for l in
                                       bench.squad_multiple_choice(paths["train"], tmp_path / "again.jsonl")
                                       .read_text().splitlines()]  # deterministic
    from megamt.eval.metrics import normalize_answer

    for i, r in enumerate(rows):
        assert len(r["choices"]) == 4 and r["label"] == i % 4
        assert len({normalize_answer(c) for c in r["choices"]}) == 4  # "the Denver Broncos" is no distractor of "Denver Broncos"
    tsv = tmp_path / "t.tsv"
    tsv.write_text("sentence\tlabel\n" + "".join(f"s{i}\t{i % 2}\n" for i in range(10)))
    train, dev = bench.split_tsv_tail(tsv, tmp_path, "t", 3)
    assert train.read_text().splitlines()[-1] == "s6\t0" and dev.read_text().splitlines() == ["sentence\tlabel", "s7\t1",
                                                                                             "s8\t0", "s9\t1"]


def test_report_reads_the_experiment(tmp_path):
    bench = _load()
    tasks = bench.TASKS
    rows = [{"task": t, "metric": "accuracy", "single": 50.0, "multitask": {"a": 40.0 + i, "b": 60.0},
             "diff": {"a": i - 10.0, "b": 10.0}} for i, t in enumerate(tasks)]
    runs = {"multitask-a": {"train_seconds": 9.0}, "multitask-b": {"train_seconds": 8.0}}
    (tmp_path / "transfer.json").write_text(json.dumps({"settings": ["a", "b"], "tasks": rows, "runs": runs}))
    for s, step_s in (("a", 2.0), ("b", 1.0)):
        run = tmp_path / "runs" / f"multitask-{s}"
        run.mkdir(parents=True)
        run.joinpath("train_log.jsonl").write_text("".join(
            json.dumps({"step": k, "perf/tokens_per_s": 1000 / step_s, "perf/step_time_s": step_s}) + "\n"
            for k in range(1, 15)))
    summary = bench.summarise(tmp_path)
    a = summary["settings"]["a"]
    assert a["worst_task"] == tasks[0] and a["worst_score"] == 40.0 and a["largest_drop"] == -10.0
    assert a["mean"] == 40.0 + sum(range(len(tasks))) / len(tasks) and a["tokens_per_step"] == 1000.0
    assert summary["settings"]["b"]["tokens_per_s"] == 1000.0 and a["median_step_s"] == 2.0
    assert "| b | " + " | ".join(["60.00"] * len(tasks)) in bench.markdown(summary, "cmd")
