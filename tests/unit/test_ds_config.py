"""ds_config templates: "auto" filled from megamt's config; every mismatch reported at once."""

import pytest
import torch

from megamt.config import MultitaskConfig, ModelConfig, TaskConfig, TrainConfig
from megamt.ds_config import (TEMPLATES, DsConfigError, build_ds_config, load_template,
                              resolve_ds_config, zero_stage)


def make_cfg(**train):
    return MultitaskConfig(tasks={"a": TaskConfig(task_type="classification")},
                           model=ModelConfig(from_config={"model_type": "llama"}),
                           train=TrainConfig(**{"micro_batch_size": 3, "grad_accum": 2, "lr": 1e-3, "grad_clip": 0.5,
                                                "betas": [0.8, 0.9], "weight_decay": 0.1, "max_steps": 50,
                                                "warmup_steps": 5, "min_lr_ratio": 0.2, **train}))


@pytest.mark.parametrize("name", TEMPLATES)
def test_templates_fill_every_auto(name):
    ds = build_ds_config(make_cfg(ds_config=name), world_size=4, hidden_size=64)
    assert "auto" not in repr(ds)
    assert ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 3 * 2 * 4
    assert ds["gradient_clipping"] == 0.5
    params = dict(ds["optimizer"]["params"])
    # CPU ranks without optimizer offload use torch's AdamW (no JIT-built fused op)
    cpu_torch_adam = not torch.cuda.is_available() and not name.endswith("_offload")
    assert params.pop("torch_adam", False) is cpu_torch_adam
    assert params == {"lr": 1e-3, "betas": [0.8, 0.9], "eps": 1e-8, "weight_decay": 0.1}
    assert ds["scheduler"]["type"] == "WarmupCosineLR"
    assert ds["scheduler"]["params"]["total_num_steps"] == 50
    assert ds["scheduler"]["params"]["cos_min_ratio"] == 0.2
    assert ds["scheduler"]["params"]["warmup_num_steps"] == 5
    assert ds["bf16"]["enabled"] is False
    assert ds["zero_optimization"]["reduce_bucket_size"] == 64 * 64
    assert zero_stage(ds) == (2 if name.startswith("zero2") else 3)
    if name.endswith("_offload"):
        assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


def test_literal_values_that_agree_are_kept_and_grad_methods_set_accumulation():
    template, _ = load_template("zero3")
    template["train_micro_batch_size_per_gpu"] = 3
    template["scheduler"] = {"type": "WarmupLR", "params": "auto"}
    ds = resolve_ds_config(template, make_cfg(lr_schedule="constant"), world_size=2, grad_accum=5, dtype="bf16")
    assert ds["gradient_accumulation_steps"] == 5 and ds["train_batch_size"] == 30
    assert ds["scheduler"]["params"]["warmup_max_lr"] == 1e-3
    assert ds["bf16"]["enabled"] is True


def test_all_mismatches_reported_together():
    template, _ = load_template("zero3")
    template["train_micro_batch_size_per_gpu"] = 8
    template["gradient_clipping"] = 1.0
    template["optimizer"]["params"]["lr"] = 5e-5
    template["scheduler"]["type"] = "WarmupDecayLR"
    template["zero_optimization"]["sub_group_size"] = "auto"
    with pytest.raises(DsConfigError) as err:
        resolve_ds_config(template, make_cfg(), world_size=2, source="my.json")
    problems = err.value.problems
    assert len(problems) == 5, problems
    text = str(err.value)
    for needle in ("train_micro_batch_size_per_gpu = 8", "train.micro_batch_size", "gradient_clipping = 1.0",
                   "train.grad_clip", "optimizer.params.lr", "train.lr", "scheduler.type",
                   "train.lr_schedule=cosine", "zero_optimization.sub_group_size", "my.json"):
        assert needle in text, needle


def test_unknown_template_names_the_choices(tmp_path):
    with pytest.raises(FileNotFoundError, match="zero3_offload"):
        load_template("zero4")
    bad = tmp_path / "x.json"
    bad.write_text("{oops")
    with pytest.raises(DsConfigError, match="not valid JSON"):
        load_template(str(bad))


def test_stale_extension_build_locks_are_named(tmp_path, monkeypatch, capsys):
    # a lock left by a killed JIT build makes DeepSpeed's op loader wait forever: say so up front
    import os
    import time

    from megamt.trainer import warn_stale_build_locks

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    old = tmp_path / "py311_cpu" / "cpu_adam" / "lock"
    fresh = tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "lock"
    top = tmp_path / "fused_adam" / "lock"  # TORCH_EXTENSIONS_DIR set: no per-python subfolder
    for f in (old, fresh, top):
        f.parent.mkdir(parents=True)
        f.touch()
    hour_ago = time.time() - 3600
    os.utime(old, (hour_ago, hour_ago))
    os.utime(top, (hour_ago, hour_ago))
    assert warn_stale_build_locks(min_age_s=600) == sorted([top, old])
    err = capsys.readouterr().err
    assert f"WARNING {old} is 60 min old" in err and str(top) in err and str(fresh) not in err
    assert warn_stale_build_locks(min_age_s=7200) == []


def test_gradients_are_reduced_in_fp32_unless_the_user_opts_out():
    """DeepSpeed 0.19.8 reads the top-level communication_data_type (engine.communication_data_type,
    default: the model dtype) in ZeRO-3's __avg_scatter_grads and in ZeRO-1/2's reductions; megamt
    resolves it to fp32 (train.grad_comm_dtype) -- test_trainer_hot_path records the dtype ZeRO-3
    hands to its reduce-scatter."""
    from deepspeed.runtime.config import DeepSpeedConfig

    for name in TEMPLATES:
        ds = build_ds_config(make_cfg(ds_config=name), world_size=1, hidden_size=64, dtype="bf16")  # this process
        assert ds["communication_data_type"] == "fp32" and ds["bf16"]["enabled"] is True
        assert DeepSpeedConfig(ds).communication_data_type == torch.float32
    ds = build_ds_config(make_cfg(grad_comm_dtype="model"), world_size=1, hidden_size=64, dtype="bf16")
    assert ds["communication_data_type"] == "bf16" and DeepSpeedConfig(ds).communication_data_type == torch.bfloat16
    assert build_ds_config(make_cfg(grad_comm_dtype="model"), world_size=2)["communication_data_type"] == "fp32"
    template, _ = load_template("zero3")
    template["communication_data_type"] = "bf16"  # a literal that disagrees is an error naming both
    with pytest.raises(DsConfigError, match="communication_data_type = 'bf16'.*train.grad_comm_dtype=fp32"):
        resolve_ds_config(template, make_cfg(), world_size=2, dtype="bf16")
    template["communication_data_type"] = "auto"
    assert resolve_ds_config(template, make_cfg(), world_size=2, dtype="bf16")["communication_data_type"] == "fp32"

def test_surgery_in_bf16_under_zero3_accumulates_in_fp32():
    from megamt.config import GradientConfig

    def resolved(method="none", monitor_every=0, dtype="bf16", template="zero3", literal=None):
        cfg = make_cfg(ds_config=template)
        cfg.gradients = GradientConfig(method=method, monitor_every=monitor_every)
        tpl, source = load_template(template)
        if literal is not None:
            tpl["data_types"] = {"grad_accum_dtype": literal}
        return resolve_ds_config(tpl, cfg, world_size=2, dtype=dtype, source=source)

    # surgery differences ZeRO-3's running sums: fp32 accumulation, created in the resolved config
    assert resolved(method="pcgrad")["data_types"] == {"grad_accum_dtype": "fp32"}
    assert resolved(monitor_every=10)["data_types"] == {"grad_accum_dtype": "fp32"}
    assert resolved(method="sum", template="zero3_offload")["data_types"] == {"grad_accum_dtype": "fp32"}
    # nothing to difference: DeepSpeed's own choice stays (no surgery, fp32 model, ZeRO-1/2 resets per task)
    assert "data_types" not in resolved()
    assert "data_types" not in resolved(method="pcgrad", dtype="fp32")
    assert "data_types" not in resolved(method="pcgrad", template="zero2")
    # a literal bf16 accumulation would make the differences wrong: named, not overridden
    with pytest.raises(DsConfigError, match="data_types.grad_accum_dtype = 'bf16'.*gradient surgery"):
        resolved(method="pcgrad", literal="bf16")
    assert resolved(method="pcgrad", literal="fp32")["data_types"] == {"grad_accum_dtype": "fp32"}
