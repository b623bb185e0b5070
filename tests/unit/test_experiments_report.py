"""`megamt report RUN_DIR` on a synthetic run's TensorBoard log: every section's numbers."""

import json

import numpy as np
import pytest
import yaml

from test_experiments_spec import write_base


@pytest.fixture
def run_dir(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    run = tmp_path / "run"
    run.mkdir()
    base = yaml.safe_load(write_base(tmp_path).read_text())  # tasks a, b, c; phases at steps 0 and 5
    (run / "config.yaml").write_text(yaml.safe_dump(base))
    w = SummaryWriter(str(run / "tensorboard"))
    for step in range(1, 11):
        for i, t in enumerate("abc"):
            w.add_scalar(f"train/loss/{t}", 3.0 - 0.1 * step + i, step)
            w.add_scalar(f"mix/prob/{t}", [0.5, 0.3, 0.2][i], step)
        w.add_scalar("perf/tokens_per_s", 1000.0, step)
        if step % 2 == 0:  # measuring steps 2, 4, 6, 8, 10; a/b conflict in phase 0 only
            w.add_scalar("grad/cos/a/b", -0.5 if step < 6 else 0.5, step)
            w.add_scalar("grad/cos/a/c", 0.2, step)
            w.add_scalar("grad/cos/b/c", -0.1, step)
            w.add_scalar("affinity/a/b", 0.01 * step, step)
            w.add_scalar("affinity/b/a", -0.02, step)
            w.add_scalar("affinity_first_order/a/b", 0.03, step)
    for step in (0, 10):
        w.add_scalar("eval/loss/a", 2.0 - 0.1 * step, step)
        w.add_scalar("eval/a/accuracy", 50.0 + step, step)
    w.close()
    return run


def test_report_sections_numbers_and_plots(run_dir, capsys):
    from megamt.experiments.report import main

    assert main([str(run_dir)]) == 0
    out = run_dir / "report"
    md = (out / "report.md").read_text()
    res = json.loads((out / "report.json").read_text())
    assert res["steps"] == 10 and res["tasks"] == ["a", "b", "c"]
    # phases from mixture.phases: steps 1-5 (a/b and b/c conflict: 2 of 3 pairs), 6-10 (b/c only: 1 of 3)
    shares = {r["phase"].split(" (")[0]: r for r in res["conflicts"]}
    assert shares["phase 0"]["steps"] == "1-5" and shares["phase 0"]["measured_steps"] == 2
    assert shares["phase 0"]["conflict_share"] == pytest.approx(2 / 3)
    assert shares["phase 1"]["conflict_share"] == pytest.approx(1 / 3) and shares["phase 1"]["measured_steps"] == 3
    assert "| phase 0 (a) | 1-5 | 2 | 67 % |" in md
    lookahead = np.array(res["affinity"]["lookahead"], dtype=float)
    assert lookahead[0, 1] == pytest.approx(0.06) and lookahead[1, 0] == pytest.approx(-0.02)  # means over 5 steps
    assert res["affinity"]["first order"][0][1] == pytest.approx(0.03)
    assert res["eval"] == {"a/accuracy": 60.0}
    assert "| a | 2.9 | 2 | 2 | 1 |" in md  # first/last train loss, first/last validation loss
    for png in ("loss_curves.png", "mixture.png", "cosine_over_time.png", "cosine_by_phase.png", "affinity.png",
                "eval_metrics.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG", png
        assert png in res["plots"]


def test_report_of_a_run_without_interference_logs_says_so(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    from megamt.experiments.report import build_report, main

    w = SummaryWriter(str(tmp_path / "tensorboard"))
    for step in range(1, 4):
        w.add_scalar("train/loss/x", 1.0 / step, step)
    w.close()
    res = build_report(tmp_path, tmp_path / "r")
    md = (tmp_path / "r" / "report.md").read_text()
    assert "No task-gradient cosines logged" in md and "No affinity logged" in md and "No metrics logged" in md
    assert res["plots"] == ["loss_curves.png"]
    assert main([str(tmp_path / "nothing")]) == 2
