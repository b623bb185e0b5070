"""Every command sequence of README.md runs as written.

The ```bash blocks are taken from README.md and each one is run by ``bash -e`` as it stands,
in a fresh folder, with this environment's console scripts first on PATH. A ```yaml block
whose first line is ``# file: NAME`` is the file the commands after it read, written there
first. A bash block that cannot run inside the suite says why in an HTML comment right above
it (``<!-- not run by tests/integration/test_readme.py: REASON -->``); only installs and the
suite itself may (checked below), or a block another test runs literally from README.md
(REASON = ``run literally by tests/...py``).

What the test supplies, as a user would have it: the CSV files of "Your own data" (the
SST-2 sample rewritten as headerless, quoted CSV: 1,500 training and 200 dev rows, to keep
the run short).
What it changes: nothing in the commands; the ``deepspeed`` launcher found on PATH is a
wrapper that adds a free ``--master_port`` (the default 29500 may be taken on a shared
machine). Cost: one 2-rank launch per block that trains (about 2.5 min together).
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
from launching import run_tree, user_shell_env

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
SST2 = REPO / ".." / "shared" / "data" / "sst2"
SKIP_MARK = "<!-- not run by tests/integration/test_readme.py:"
MAY_SKIP = ("make ", "pip install torch", "pip install -e", "make install")  # installs, and the suite itself


def fenced_blocks(text: str) -> list[dict]:
    """``[{"lang", "body", "skip": reason | None, "line"}]`` of the fenced blocks, in order."""
    out, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = re.match(r"^```(\w+)\s*$", lines[i])
        if not m:
            i += 1
            continue
        start, j = i, i + 1
        while j < len(lines) and lines[j].strip() != "```":
            j += 1
        prev = next((lines[k] for k in range(start - 1, -1, -1) if lines[k].strip()), "")
        skip = prev.split(":", 1)[1].rstrip(" ->").strip() if prev.startswith(SKIP_MARK) else None
        out.append({"lang": m.group(1), "body": "\n".join(lines[start + 1:j]) + "\n", "skip": skip, "line": start + 1})
        i = j + 1
    return out


def commands(body: str) -> list[str]:
    return [ln.split("#")[0].strip() for ln in body.splitlines() if ln.split("#")[0].strip()]


def test_every_bash_block_is_run_or_says_why_not():
    blocks = [b for b in fenced_blocks(README.read_text(encoding="utf-8")) if b["lang"] == "bash"]
    assert len([b for b in blocks if b["skip"] is None]) >= 2
    for b in blocks:
        if b["skip"] is not None:
            assert b["skip"], f"README.md:{b['line']}: the skip comment gives no reason"
            other = re.search(r"run literally by (tests/\S+\.py)", b["skip"])
            if other:  # another test runs this block from README.md itself (e.g. with a kill in between)
                assert "README.md" in (REPO / other.group(1)).read_text(encoding="utf-8"), b["skip"]
                continue
            bad = [c for c in commands(b["body"]) if not c.startswith(MAY_SKIP)]
            assert not bad, f"README.md:{b['line']}: only installs and the suite may be skipped, not {bad}"


def _user_csv(folder: Path, n_train: int = 1500, n_dev: int = 200) -> float:
    """data/train.csv and data/dev.csv as "Your own data" describes them (label,text, no header,
    quoted where needed) from the SST-2 sample; returns the dev majority rate (%)."""
    folder.mkdir(parents=True, exist_ok=True)
    majority = 0.0
    for src, dst, limit in (("train.tsv", "train.csv", n_train), ("dev.tsv", "dev.csv", n_dev)):
        rows = [ln.split("\t") for ln in (SST2 / src).read_text(encoding="utf-8").splitlines()[1:]][:limit]
        with open(folder / dst, "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([["positive" if lab == "1" else "negative", text.strip()] for text, lab in rows])
        if dst == "dev.csv":
            pos = sum(lab == "1" for _, lab in rows)
            majority = 100.0 * max(pos, len(rows) - pos) / len(rows)
    return majority


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    """Run the README's blocks in order in one fresh folder; ``{block index: output}``."""
    if not SST2.is_dir():
        pytest.skip("no ../shared/data (the CSV of 'Your own data' is made from its SST-2 sample)")
    work = tmp_path_factory.mktemp("readme")
    (work / "examples").symlink_to(REPO / "examples")  # commands run from a checkout's root
    majority = _user_csv(work / "data")
    env = user_shell_env(work / ".bin")
    outputs = {}
    for i, b in enumerate(fenced_blocks(README.read_text(encoding="utf-8"))):
        if b["lang"] == "yaml" and b["body"].startswith("# file: "):
            name = b["body"].splitlines()[0][len("# file: "):].strip()
            (work / name).write_text(b["body"], encoding="utf-8")
        elif b["lang"] == "bash" and b["skip"] is None:
            rc, out = run_tree(["bash", "-e", "-o", "pipefail", "-c", b["body"]], 600, cwd=work, env=env)
            assert rc == 0, f"README.md:{b['line']} failed ({rc}):\n{b['body']}\n{out[-5000:]}"
            outputs[i] = out
    return work, outputs, majority


def test_quick_start_runs_as_written(ran):
    work, outputs, _ = ran
    hf = work / "runs" / "quick" / "hf"
    assert (hf / "config.json").is_file() and (hf / "tokenizer.json").is_file()
    res = json.loads((hf / "eval" / "eval.json").read_text())
    assert set(res["tasks"]) == {"sentiment", "nli", "qa", "ner", "summ", "instruct"}
    for name, e in res["tasks"].items():  # the last command: every template, mean ± std
        assert e["n_examples"] == 5 and e["metrics"], name
        assert "per_template" in e and e["template"].startswith("mean of"), name
    log = [json.loads(x) for x in (work / "runs" / "quick" / "run" / "train_log.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in log) == 30


def test_own_csv_beats_the_majority_baseline(ran):
    """'Your own data' on a CSV the project never saw: above the majority baseline at once."""
    work, outputs, majority = ran
    text = "\n".join(outputs.values())
    assert "tokenizer check (per task):" in text and "WARNING reviews" not in text
    res = json.loads((work / "runs" / "mine" / "hf" / "eval" / "eval.json").read_text())
    e = res["tasks"]["reviews"]
    assert e["n_examples"] == 200
    print(f"README own-CSV: dev accuracy {e['metrics']['accuracy']:.1f} vs majority {majority:.1f}")
    assert e["metrics"]["accuracy"] > majority + 10, (e["metrics"], majority)
