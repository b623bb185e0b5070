"""meta.* config keys, the combinations refused with a named key, the rank-identical task draw
and Reptile's eps schedule (the partition arithmetic itself: tests/integration/test_meta.py)."""

from __future__ import annotations

from collections import Counter

import pytest

from megamt.config import ConfigError, MultitaskConfig, config_from_dict
from megamt.gradients.meta import reptile_epsilon, sample_meta_tasks


def _raw(**sections):
    raw = {"tasks": {"a": {"task_type": "classification", "inputs": {"train": {"path": "a.tsv"}}, "labels": ["x", "y"]},
                     "b": {"task_type": "classification", "inputs": {"train": {"path": "b.tsv"}}, "labels": ["x", "y"]}}}
    raw.update(sections)
    return raw


def _problems(**sections) -> str:
    with pytest.raises(ConfigError) as e:
        config_from_dict(_raw(**sections))
    return str(e.value)


def test_defaults_and_a_valid_meta_section():
    assert MultitaskConfig().meta.method == "none"
    cfg = config_from_dict(_raw(meta={"method": "fomaml", "inner_steps": 3, "inner_optimizer": "adam"}))
    assert cfg.meta.method == "fomaml" and cfg.meta.inner_steps == 3 and cfg.meta.inner_betas == [0.0, 0.999]


@pytest.mark.parametrize("meta, key", [
    ({"method": "maml2"}, "meta.method"),
    ({"method": "reptile", "inner_steps": 0}, "meta.inner_steps"),
    ({"method": "reptile", "inner_lr": 0}, "meta.inner_lr"),
    ({"method": "reptile", "inner_optimizer": "lion"}, "meta.inner_optimizer"),
    ({"method": "reptile", "outer_lr": 1.5}, "meta.outer_lr"),
    ({"method": "reptile", "outer_lr_schedule": "cosine"}, "meta.outer_lr_schedule"),
    ({"method": "reptile", "inner_betas": [0.9]}, "meta.inner_betas"),
    ({"method": "reptile", "shots": 3}, "meta.shots: unknown config key"),
    ({"method": "reptile", "tasks_per_step": 0}, "meta.tasks_per_step"),
    ({"method": "fomaml", "tasks_per_step": 2}, "meta.tasks_per_step=2: batched outer steps are defined for reptile"),
])
def test_bad_meta_values_name_the_key(meta, key):
    assert key in _problems(meta=meta)


@pytest.mark.parametrize("sections, key", [
    ({"gradients": {"method": "pcgrad"}}, "gradients.method=pcgrad"),
    ({"gradients": {"monitor_every": 5}}, "gradients.monitor_every"),
    ({"gradients": {"loss_weighting": "dwa"}}, "gradients.loss_weighting=dwa"),
    ({"model": {"name_or_path": "m", "dtype": "fp16"}}, "model.dtype=fp16"),
    ({"train": {"grad_accum": 4}}, "train.grad_accum=4"),
])
def test_combinations_meta_does_not_define_are_refused(sections, key):
    msg = _problems(meta={"method": "reptile"}, **sections)
    assert key in msg and "meta.method=reptile" in msg


def test_ds_config_problems_name_the_template():
    from megamt.trainer import meta_ds_problems

    cfg = config_from_dict(_raw(meta={"method": "fomaml"}, train={"ds_config": "stage0.json"}))
    [msg] = meta_ds_problems({"zero_optimization": {"stage": 0}}, cfg)
    assert "train.ds_config=stage0.json" in msg and "stage 0" in msg and "zero2" in msg and "zero3" in msg
    for stage in (1, 2, 3):  # ZeRO-1/2/3 partitions are supported
        assert meta_ds_problems({"zero_optimization": {"stage": stage}}, cfg) == []
    nvme = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme"}}, "fp16": {"enabled": True}}
    msgs = meta_ds_problems(nvme, cfg)
    assert len(msgs) == 2 and "offload_optimizer.device=nvme" in msgs[0] and "fp16" in msgs[1]
    assert meta_ds_problems({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}, cfg) == []


def test_task_draw_is_a_function_of_seed_and_step_and_follows_the_rates():
    tasks = ["a", "b", "c"]
    rates = {"a": 0.7, "b": 0.3, "c": 0.0}
    draws = [sample_meta_tasks(rates, tasks, seed=1, step=s)[0] for s in range(2000)]
    assert draws == [sample_meta_tasks(rates, tasks, seed=1, step=s)[0] for s in range(2000)]  # every rank, resume
    n = Counter(draws)
    assert n["c"] == 0 and abs(n["a"] / 2000 - 0.7) < 0.05
    assert draws != [sample_meta_tasks(rates, tasks, seed=2, step=s)[0] for s in range(2000)]
    batch = sample_meta_tasks(rates, tasks, seed=1, step=5, n=3)
    assert len(batch) == 3 and batch[0] == draws[5] and "c" not in batch


def test_reptile_epsilon_schedules():
    assert reptile_epsilon(0.5, "constant", 7, 10) == 0.5
    assert [reptile_epsilon(1.0, "linear", s, 4) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]
    with pytest.raises(ValueError, match="meta.outer_lr_schedule"):
        reptile_epsilon(1.0, "cosine", 0, 4)


def test_train_command_refuses_a_stage0_ds_config_once_before_launching(tmp_path, capsys):
    """`megamt train` checks the template before the process group (one message, exit status 2)."""
    import json

    import yaml as _yaml

    from megamt.train import main

    ds = tmp_path / "stage0.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 0}}))
    spec = tmp_path / "spec.yaml"
    spec.write_text(_yaml.safe_dump(_raw(meta={"method": "reptile"}, train={"ds_config": str(ds),
                                                                            "run_dir": str(tmp_path / "run")})))
    assert main([str(spec)]) == 2
    err = capsys.readouterr().err
    assert f"train.ds_config={ds}: meta.method=reptile runs on ZeRO partitions (got stage 0)" in err
    assert "Traceback" not in err and err.count("runs on ZeRO partitions") == 1


def test_memory_plan_counts_the_meta_buffers():
    """megamt plan: theta0 (+ batched displacement sum, + inner Adam m, v) as fp32 partitions, on the
    CPU when the optimizer is offloaded."""
    from test_plan import GIB, small_config

    from megamt.config import MetaConfig
    from megamt.plan import model_shape, plan_memory

    cfg = small_config()
    shape = model_shape(cfg)
    assert "meta-learning buffers" not in {i.name for i in plan_memory(cfg, shape, world_size=4,
                                                                         device_bytes=10 * GIB).persistent}
    cfg.meta = MetaConfig(method="reptile", inner_optimizer="adam", tasks_per_step=2)
    plan = plan_memory(cfg, shape, world_size=4, device_bytes=10 * GIB)
    assert {i.name: i.bytes for i in plan.persistent}["meta-learning buffers"] == 4 * 4 * (7888 // 4)
    cfg.train.ds_config = "zero3_offload"
    off = plan_memory(cfg, shape, world_size=4, device_bytes=10 * GIB, gpus_per_node=4)
    assert {i.name: i.bytes for i in off.persistent}["meta-learning buffers"] == 0
    assert off.cpu_bytes_per_node == 4 * (2 * 7888 // 4 + 16 * 7888 // 4 + 16 * 7888 // 4)
