"""The trainer's hot path in one process (a world of one, plain python, a tiny bf16 Llama under
ZeRO-3): host-device syncs per micro-batch, the closing reduction (stop flag, non-finite
detection, step times over ranks), fp32 gradient reduce-scatter and gradient checkpointing auto.

GPU behaviours proven on the CPU by design:
- host-device syncs: a stand-in (tests/unit/sync_counter.py) records every call that would make
  the host wait for a CUDA device (item/cpu/tolist/float()/nonzero/mask indexing/blocking
  copies), by file and thread, during a real train step;
- fp32 reduce-scatter: a stand-in for DeepSpeed's collective records the dtype ZeRO-3 hands to
  it (reduce_scatter_coalesced, the call NCCL would run).
One trainer (about 15 s to build) serves every test of the module.
"""

from __future__ import annotations

import os
import signal
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from megamt.config import ModelConfig, MultitaskConfig, TaskConfig, TrainConfig

sys.path.insert(0, str(Path(__file__).parent))
from packed_batches import pack_rows, random_rows  # noqa: E402
from sync_counter import SyncCounter  # noqa: E402

VOCAB = 97
TASKS = ("a", "b", "c")
GRAD_ACCUM = 4


class FakePipeline:
    """Random packed micro-batches from its own generator; state = the generator's state."""

    def __init__(self, rows: int = 2, seq_len: int = 32):
        self.gen = torch.Generator().manual_seed(0)
        self.rows, self.seq_len, self.step = rows, seq_len, 0

    def set_step(self, step: int) -> None:
        self.step = step

    def rates(self, step=None) -> dict[str, float]:
        return {t: 1 / len(TASKS) for t in TASKS}

    def next_batch(self, task=None) -> dict:
        tasks = None if task is None else [TASKS.index(task)]
        return pack_rows(random_rows(self.gen, self.rows, self.seq_len, len(TASKS), VOCAB, tasks), self.seq_len)

    def state_dict(self) -> dict:
        return {"gen": self.gen.get_state().tolist(), "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(torch.tensor(state["gen"], dtype=torch.uint8))
        self.step = state["step"]


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    from megamt.trainer import MultitaskTrainer

    fc = {"model_type": "llama", "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
    cfg = MultitaskConfig(
        tasks={t: TaskConfig() for t in TASKS},
        model=ModelConfig(from_config=fc, attn_implementation="sdpa", dtype="bf16"),  # gradient_checkpointing: auto
        train=TrainConfig(run_dir=str(tmp_path_factory.mktemp("hot") / "run"), grad_accum=GRAD_ACCUM,
                          micro_batch_size=2, max_steps=20, warmup_steps=1, lr=1e-3, max_nonfinite_steps=3))
    env = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    tr = MultitaskTrainer(None, cfg, pipeline=FakePipeline(), resume=False)  # joins a world of one
    tr.train_step()  # the first step builds DeepSpeed's buffers; the counted ones follow
    tr.step += 1
    yield tr
    tr.pipeline.close()
    # leave the pytest process as it was: no process group, no launcher variables
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def counted_step(trainer) -> tuple[SyncCounter, object]:
    """One train step with the stand-in on; a section per micro-batch (from its forward to the next)."""
    original = trainer.forward_backward_step
    calls = {"n": 0}

    def marked(*args, **kwargs):
        counter.mark(f"micro-batch {calls['n']}")
        calls["n"] += 1
        return original(*args, **kwargs)

    with SyncCounter() as counter:
        counter.mark("before the loop")
        trainer.forward_backward_step = marked
        try:
            result = trainer.train_step()
        finally:
            del trainer.forward_backward_step
    trainer.step += 1
    assert calls["n"] == GRAD_ACCUM
    return counter, result


def test_no_megamt_host_sync_inside_the_micro_batch_loop_and_one_transfer_per_step(trainer):
    """Before this change the stand-in counted 56 calls per step from megamt's files in the main
    thread, 4 per micro-batch (.cpu() of the loss sums; blocking .to() of the counts, the weights
    and the hint); now 0 per micro-batch and 2 per step: the closing transfer and the read of the
    balancer's weights (host tensors on every machine). The batches' counting moved to the
    prefetch thread (host tensors)."""
    counter, _ = counted_step(trainer)
    megamt_main = SyncCounter.select(counter.calls, "/megamt/")
    loop = Counter()
    for name, section in counter.sections.items():
        if name.startswith("micro-batch") and name != f"micro-batch {GRAD_ACCUM - 1}":
            loop += SyncCounter.select(section, "/megamt/")
    assert SyncCounter.total(loop) == 0, loop
    # the last micro-batch's section runs to the end of the step: the closing transfer is there
    assert sorted((k[2], k[0].rsplit("/", 1)[-1]) for k in megamt_main) == [
        ("tolist", "trainer.py"), ("tolist", "trainer.py")], megamt_main
    assert SyncCounter.total(megamt_main) == 2
    # the kernels' own syncs (the active-token count, the hint check) are the kernels' business
    kernels = SyncCounter.select(counter.calls, "/kernels/")
    print(f"\nper step: megamt {SyncCounter.total(megamt_main)}, kernels {SyncCounter.total(kernels)} "
          f"({SyncCounter.total(kernels) // GRAD_ACCUM} per micro-batch), all files "
          f"{SyncCounter.total(SyncCounter.select(counter.calls, ''))}")


def test_the_stand_in_sees_the_syncs_it_claims_to():
    """The counter is not blind: each kind of call it claims is recorded, with its file and line."""
    t = torch.ones(3)
    with SyncCounter() as c:
        t.sum().item(), t.cpu(), t.tolist(), float(t[0]), bool(t[0] > 0), t.nonzero(), t[t > 0]
        t.to("cpu"), t.to("cpu", non_blocking=True), t.to(torch.float64), torch.zeros(3).copy_(t)
        torch.zeros(3).copy_(t, non_blocking=True)
    kinds = Counter(k[2] for k in SyncCounter.select(c.calls, "test_trainer_hot_path"))
    assert kinds == Counter({"item": 1, "cpu": 1, "tolist": 1, "__float__": 1, "__bool__": 1, "nonzero": 1,
                             "mask index": 1, "to(blocking)": 1, "copy_(blocking)": 1}), kinds


def test_stop_flag_nonfinite_detection_and_step_times_ride_on_the_closing_reduction(trainer):
    trainer._signal = signal.SIGUSR1
    try:
        r = trainer.train_step()
    finally:
        trainer._signal = None
    trainer.step += 1
    assert r.stop_requested
    assert 0 < r.step_time_s_min <= r.step_time_s_max <= r.step_time_s  # one rank: min == max
    assert r.step_time_s_min == r.step_time_s_max and r.data_wait_s_max >= 0
    assert sum(r.task_tokens.values()) > 0 and r.tokens > 0
    assert all(v == v for v in r.task_loss.values())
    # a NaN loss in the first task with targets: reported by name, update skipped, counted
    trainer._fault_steps = {trainer.step + 1}
    try:
        r = trainer.train_step()
    finally:
        trainer._fault_steps = set()
    trainer.step += 1
    assert not r.applied and len(r.nonfinite_tasks) == 1 and r.nonfinite_tasks[0] in TASKS
    assert trainer.consecutive_nonfinite == 1
    r = trainer.train_step()
    trainer.step += 1
    assert r.applied and not r.stop_requested and trainer.consecutive_nonfinite == 0


def test_gradients_are_reduce_scattered_in_fp32_by_deepspeed(trainer, monkeypatch):
    """ZeRO-3 with a bf16 model: the resolved ds_config asks for fp32 communication and DeepSpeed
    0.19.8's stage 3 casts the gradients to fp32 before its reduce-scatter (stand-in records)."""
    import deepspeed.runtime.zero.stage3 as stage3

    assert trainer.ds_config["communication_data_type"] == "fp32" and trainer.ds_config["bf16"]["enabled"]
    assert trainer.engine.communication_data_type == torch.float32
    seen = []
    real = stage3.reduce_scatter_coalesced

    def recording(tensors, group=None):
        seen.extend(t.dtype for t in tensors)
        return real(tensors, group)

    monkeypatch.setattr(stage3, "reduce_scatter_coalesced", recording)
    trainer.train_step()
    trainer.step += 1
    assert seen and set(seen) == {torch.float32}, Counter(seen)
    assert next(trainer.model.parameters()).dtype == torch.bfloat16


def test_gradient_checkpointing_auto_is_off_for_a_tiny_model(trainer):
    d = trainer.derived()
    assert d["gradient_checkpointing_setting"] == "auto" and d["gradient_checkpointing"] is False
    assert 0 < d["memory_plan_peak_gib"] < d["device_memory_gib"]
    assert d["prefetch"] is True and d["grad_comm_dtype"] == "fp32"


def test_gradient_checkpointing_auto_turns_on_when_the_estimate_does_not_fit(trainer, monkeypatch):
    """The same trainer's decision with the device memory made smaller than its estimate."""
    import megamt.plan

    monkeypatch.setattr(megamt.plan, "device_memory_bytes", lambda local=1: trainer.memory_plan.peak - 1)
    enabled = []
    monkeypatch.setattr(trainer.model, "enable_gradient_checkpointing", lambda: enabled.append(True))
    plan = trainer.resolve_gradient_checkpointing(getattr(trainer.model.backbone, "config"))
    assert plan.gradient_checkpointing and enabled == [True]
    assert plan.activations[True] < plan.activations[False]


def _most_gathered(trainer) -> int:
    """The most parameter elements present in full at once during forward-only passes (a ZeRO-3
    parameter holds its full data only while gathered), sampled as every module starts."""
    params = list(trainer.engine.module.parameters())
    most = [0]

    def sample(*_):
        most[0] = max(most[0], sum(p.numel() for p in params))

    module = trainer.engine.module
    hooks = [m.register_forward_pre_hook(sample) for m in module.modules()]
    module.eval()
    try:
        with torch.no_grad():
            for _ in range(3):  # forward-only passes, as validation and evaluation run them
                module(trainer.pipeline.next_batch())
    finally:
        module.train()
        for h in hooks:
            h.remove()
    return most[0]


def test_validation_bounds_the_parameters_gathered_at_once(trainer, monkeypatch):
    """Validation runs with ZeRO-3's evaluation limits (megamt.ds_config.eval_zero_limits: two
    prefetch buckets live, no reuse distance), restored after: the training template's 1e9 kept
    61 % of a 110M model gathered in evaluation (BENCHMARKS.md "Evaluation memory"). Measured
    proxy here, on the real engine after a training step (its trace continues into a
    backward): the most elements gathered at once in forward-only passes, bounded vs not."""
    import megamt.trainer as T
    from megamt.ds_config import eval_zero_limits

    coordinator = trainer.engine.optimizer.parameter_offload.get_param_coordinator()
    fields = list(T._COORDINATOR_LIMITS.values())
    before = [getattr(coordinator, f) for f in fields]
    limits = eval_zero_limits(trainer.ds_config)
    bucket = trainer.ds_config["zero_optimization"]["stage3_prefetch_bucket_size"]
    assert limits == {"stage3_max_live_parameters": 2 * bucket, "stage3_max_reuse_distance": 0}
    seen = []
    real = trainer.evaluate_loss
    monkeypatch.setattr(trainer, "evaluate_loss", lambda split=None: seen.append(
        [getattr(coordinator, f) for f in fields]) or real(split))
    trainer.validate()
    assert seen == [[2 * bucket, 0]] and [getattr(coordinator, f) for f in fields] == before  # restored
    with pytest.raises(RuntimeError, match="a failing evaluation"):  # restored on an error too, which propagates
        with T.bounded_gathering(trainer.engine, limits):
            raise RuntimeError("a failing evaluation")
    assert [getattr(coordinator, f) for f in fields] == before
    monkeypatch.setattr(trainer, "evaluate_loss", real)
    import contextlib

    most = {}
    for name in ("bounded", "fresh trace only", "as before"):  # each after a completed step
        trainer.train_step()
        trainer.step += 1
        context = {"bounded": T.bounded_gathering(trainer.engine, limits),
                   "fresh trace only": T.bounded_gathering(trainer.engine, {
                       "stage3_max_live_parameters": before[0], "stage3_max_reuse_distance": before[1]}),
                   "as before": contextlib.nullcontext()}[name]
        with context:
            most[name] = _most_gathered(trainer)
    total = sum(p.ds_numel for p in trainer.engine.module.parameters())
    print(f"most of {total} elements gathered at once in forward-only passes: {most}")
    # as before: the training trace keeps everything gathered; bounded: the embedding (the largest
    # parameter, 97 x 32) plus at most two prefetch buckets and the persistent parameters
    assert most["as before"] == total
    assert eval_zero_limits(trainer.ds_config, -1) == {}  # eval.max_live_parameters=-1: DeepSpeed's own limits
    assert eval_zero_limits(trainer.ds_config, 500) == {"stage3_max_live_parameters": 500, "stage3_max_reuse_distance": 0}
    assert most["bounded"] <= 97 * 32 + 2 * bucket + sum(p.ds_numel for p in trainer.engine.module.parameters()
                                                          if p.ds_persist) < most["fresh trace only"] < total


def test_bounded_gathering_leaves_other_engines_alone():
    """ZeRO-1/2 (no parameter coordinator) or a DeepSpeed without the field: a no-op."""
    from types import SimpleNamespace

    from megamt.trainer import bounded_gathering

    for engine in (SimpleNamespace(optimizer=SimpleNamespace()), SimpleNamespace(optimizer=None), object()):
        with bounded_gathering(engine, {"stage3_max_live_parameters": 10}):
            pass
