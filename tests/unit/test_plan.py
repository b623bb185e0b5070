"""megamt.plan: the per-GPU memory arithmetic against hand-computed numbers for a small config,
DeepSpeed's own estimator for the same runs, and the `megamt plan` command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from megamt.config import GradientConfig, ModelConfig, MultitaskConfig, TaskConfig, TrainConfig, DataConfig
from megamt.plan import (GIB, RUNTIME_RESERVE, ModelShape, activation_bytes, deepspeed_estimate, model_shape,
                         plan_memory)

REPO = Path(__file__).resolve().parents[2]
SMALL = {"model_type": "llama", "vocab_size": 100, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
         "tie_word_embeddings": False}


def small_config(**model) -> MultitaskConfig:
    return MultitaskConfig(tasks={t: TaskConfig() for t in "abc"},
                           model=ModelConfig(from_config=SMALL, dtype="bf16", attn_implementation="sdpa", **model),
                           data=DataConfig(seq_len=8), train=TrainConfig(micro_batch_size=2, grad_accum=1))


def test_shape_of_a_small_llama_counted_on_the_meta_device():
    s = model_shape(small_config())
    # embed 100*16; per layer q 16*16, k,v 16*8 (2 of 4 heads), o 16*16, gate/up/down 16*32, 2 norms;
    # final norm; untied head 100*16
    per_layer = 256 + 128 + 128 + 256 + 3 * 512 + 2 * 16
    assert s.parameters == 1600 + 2 * per_layer + 16 + 1600 == s.trainable == 7888
    assert (s.layers, s.hidden, s.kv_hidden, s.intermediate, s.heads, s.vocab) == (2, 16, 8, 32, 4, 100)
    assert s.gated_mlp and s.largest_layer == 1600 and s.block_parameters == (7888 - 3200) // 2


def test_the_budget_of_a_small_config_by_hand():
    cfg = small_config(gradient_checkpointing=False)
    plan = plan_memory(cfg, model_shape(cfg), world_size=4, device_bytes=10 * GIB, gpus_per_node=4)
    P = 7888
    persistent = {i.name: i.bytes for i in plan.persistent}
    assert persistent == {"parameters": 2 * P // 4, "gradients": 2 * P // 4, "optimizer states": 12 * P // 4,
                          "runtime reserve": RUNTIME_RESERVE}
    # activations per layer and token: norms 2*(4+2)*16 + attention 2*(2*16 + 2*16) (SDPA repeats k/v)
    # + lse 4*4 + gated MLP 2*4*32 = 592; 16 tokens, 2 layers; final norm 6*16*16; SDPA mask 2*8*8
    no_ckpt = 2 * 592 * 16 + 6 * 16 * 16 + 2 * 8 * 8
    with_ckpt = 2 * 2 * 16 * 16 + 592 * 16 + 6 * 16 * 16 + 2 * 8 * 8  # layer inputs + one layer recomputed
    assert plan.activations == {False: no_ckpt, True: with_ckpt} == {False: 20608, True: 12160}
    fb = {i.name: i.bytes for i in plan.forward_backward}
    # fused loss: one block of 16 tokens x 100 (bf16 + fp32), fp32 [V,H] and [N,H] kept, the head's bf16 grad
    assert fb["loss"] == 16 * 100 * 6 + 4 * 100 * 16 + 4 * 16 * 16 + 2 * 100 * 16 == 20224
    block = (P - 2 * 100 * 16) // 2
    assert fb["gathered parameters"] == 2 * (100 * 16 + 2 * block)
    assert fb["gradient buckets"] == 2 * block + 4 * 16 * 16  # reduce bucket hidden^2 in fp32 (grad_comm_dtype)
    assert fb["activations"] == no_ckpt and "surgery buffers" not in fb
    assert [(i.name, i.bytes) for i in plan.optimizer_step] == [("fp32 gradients", 4 * (P // 4))]
    assert plan.peak == sum(persistent.values()) + sum(fb.values())  # the backward outweighs the step
    assert plan.fits and not plan.gradient_checkpointing and not plan.suggestions


def test_surgery_offload_and_checkpointing_auto():
    cfg = small_config()
    cfg.gradients = GradientConfig(monitor_every=5)
    shape = model_shape(cfg)
    plan = plan_memory(cfg, shape, world_size=4, device_bytes=10 * GIB)
    assert {i.name: i.bytes for i in plan.forward_backward}["surgery buffers"] == 4 * 3 * (7888 // 4)
    assert not plan.gradient_checkpointing  # auto: it fits
    tight = plan.peak - 1
    plan = plan_memory(cfg, shape, world_size=4, device_bytes=tight)
    assert plan.gradient_checkpointing and plan.checkpointing_setting == "auto"
    assert plan.peak_without_checkpointing == tight + 1 and plan.fits
    cfg.train.ds_config = "zero3_offload"
    off = plan_memory(cfg, shape, world_size=4, device_bytes=10 * GIB, gpus_per_node=4)
    gpu = {i.name: i.bytes for i in off.persistent}
    assert gpu["parameters"] == gpu["gradients"] == gpu["optimizer states"] == 0 and not off.optimizer_step
    assert off.cpu_bytes_per_node == 4 * (2 * 7888 // 4 + 16 * 7888 // 4)


def test_what_to_change_when_it_does_not_fit():
    cfg = small_config(gradient_checkpointing=False)
    cfg.train.micro_batch_size = 8
    shape = model_shape(cfg)
    full = plan_memory(cfg, shape, world_size=4, device_bytes=100 * GIB)
    device = RUNTIME_RESERVE + full.model_states + full.activations[True] * 2  # too small for 8 rows
    plan = plan_memory(cfg, shape, world_size=4, device_bytes=device)
    assert not plan.fits
    text = "\n".join(plan.suggestions)
    assert "model.gradient_checkpointing=true" in text
    assert "train.micro_batch_size=" in text and "train.grad_accum=" in text
    # the suggested micro-batch fits (with checkpointing, as suggested)
    rows = int(text.split("train.micro_batch_size=")[1].split()[0])
    cfg.train.micro_batch_size, cfg.model.gradient_checkpointing = rows, True
    assert plan_memory(cfg, shape, world_size=4, device_bytes=device).fits
    states_only = plan_memory(cfg, shape, world_size=4, device_bytes=RUNTIME_RESERVE + 100)
    assert "model states alone" in "\n".join(states_only.suggestions)


def test_activations_of_eager_attention_grow_with_the_square_of_the_sequence():
    s = model_shape(small_config())
    sdpa = activation_bytes(s, 1, 64, 2, checkpointing=False, attn_implementation="sdpa")
    eager = activation_bytes(s, 1, 64, 2, checkpointing=False, attn_implementation="eager")
    flash = activation_bytes(s, 1, 64, 2, checkpointing=False, attn_implementation="flash_attention_2")
    assert eager - sdpa == 2 * (4 + 2) * 4 * 64 * 64 - 64 * 64  # scores per layer, minus SDPA's mask
    assert sdpa - flash == 2 * 64 * 2 * 2 * (16 - 8) + 64 * 64  # 2 layers: k/v repeated to all heads; the mask


@pytest.mark.parametrize("params,largest,layers,hidden,inter,kv", [
    (8_030_261_248, 525_336_576, 32, 4096, 14336, 1024),     # Llama-3.1-8B
    (70_553_706_496, 1_050_673_152, 80, 8192, 28672, 1024),  # Llama-3.1-70B
])
def test_model_states_agree_with_deepspeeds_estimator(params, largest, layers, hidden, inter, kv):
    """DeepSpeed's estimate_zero3_model_states_mem_needs (18 B/param over the ranks + 4 B x the
    largest layer) against megamt's same terms (16 B/param + gathered parameters + the fp32
    gradients of one optimizer sub-group), 64 GPUs, no offload: within 15 %."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    shape = ModelShape(parameters=params, trainable=params, largest_layer=largest, largest_layer_name="embed",
                       layers=layers, hidden=hidden, kv_hidden=kv, intermediate=inter, heads=hidden // 128,
                       vocab=128256, gated_mlp=True, model_type="llama")
    cfg = small_config()
    cfg.data.seq_len, cfg.train.micro_batch_size = 4096, 1
    plan = plan_memory(cfg, shape, world_size=64, device_bytes=139 * GIB, gpus_per_node=8)
    ours, (theirs, name) = plan.deepspeed_comparable, deepspeed_estimate(plan)
    assert name == "estimate_zero3_model_states_mem_needs"
    assert theirs == estimate_zero3_model_states_mem_needs(params, largest, 8, 8, cpu_offload=False,
                                                           cpu_offload_params=False)[1]
    assert theirs == 4 * largest + int(18 * params / 64)
    assert 0.85 < ours / theirs < 1.15, (ours / GIB, theirs / GIB)


def test_megamt_plan_command_from_the_readme():
    """README.md's command, literally (the 8B example on 64 H200s: 139 GiB usable each)."""
    cmd = "megamt plan examples/llama8b_64gpu.yaml --gpus 8 --nodes 8 --gpu-mem 139 --deepspeed"
    assert cmd in (REPO / "README.md").read_text()
    exe = Path(sys.executable).parent / "megamt"
    proc = subprocess.run([str(exe), *cmd.split()[1:]], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "8.03B parameters" in out and "64 GPUs (8 node(s) x 8), 139.00 GiB each" in out
    for line in ("parameters", "optimizer states", "activations", "loss", "gathered parameters", "peak"):
        assert f"  {line}" in out or out.count(line) > 0, line
    assert ": fits" in out
    assert "DeepSpeed's estimate_zero3_model_states_mem_needs: 4.06 GiB per GPU" in out  # BENCHMARKS.md's number


def test_megamt_plan_exit_status_and_errors(tmp_path):
    cfg = tmp_path / "c.yaml"
    import yaml

    cfg.write_text(yaml.safe_dump({"tasks": {"a": {}}, "model": {"from_config": SMALL},
                                   "train": {"micro_batch_size": 64}, "data": {"seq_len": 4096}}))
    from megamt.plan import main

    assert main([str(cfg), "--gpus", "2", "--gpu-mem", "100"]) == 0
    assert main([str(cfg), "--gpus", "2", "--gpu-mem", "2.5"]) == 1  # reserve 2 GiB + 64 rows x 4096
    assert main([str(cfg), "train.nope=1", "--gpu-mem", "80"]) == 2
    assert main([str(cfg), "--gpus", "0", "--gpu-mem", "80"]) == 2
