"""`megamt plan CONFIG [overrides] [--gpus N --nodes N --gpu-mem GiB]`: the per-GPU memory
budget of a training run, before it is launched, and what to change when it does not fit.

The estimate is arithmetic on the model's shape (counted on PyTorch's ``meta`` device: no
weights are read or downloaded; ``model.name_or_path`` must be a local folder, or
``model.from_config`` a config), the resolved DeepSpeed config (ZeRO stage, offload, buckets,
gradient communication dtype) and megamt's config (rows, sequence length, fused loss, gradient
surgery). Per GPU, in bytes, with ``P`` parameters (``P_t`` trainable), ``W`` ranks, ``b`` bytes
of the model dtype:

persistent (the whole step)
    parameters        ZeRO-3: b·P/W (offload_param: on the CPU); ZeRO-0..2: b·P
    gradients         ZeRO-2/3: g·P_t/W with g = bytes of data_types.grad_accum_dtype (default:
                      the model dtype); ZeRO-0/1: b·P_t; offload_optimizer: on the CPU
    optimizer states  AdamW: 12·P_t/W (fp32 master weights, m, v; ZeRO-0: 12·P_t); offload: CPU
    meta-learning     meta.method: 4·k·P_t/W, k = 1 (theta0) + 1 (batched Reptile's displacement
      buffers         sum) + 2 (inner Adam's m, v); on the CPU with offload_optimizer
    runtime reserve   RUNTIME_RESERVE (CUDA context, NCCL and cuBLAS workspaces, fragmentation)
forward/backward of one micro-batch (transient)
    activations       per layer and token (bytes), for a Llama-like decoder layer:
                      2·(4+b)·h (two RMS/LayerNorms keep their fp32 input and their output)
                      + b·(2h + 2·h_kv') (q, k, v after RoPE, attention output; h_kv' = h_kv
                      with flash-attn, h under SDPA, which repeats the key/value heads)
                      + 4·a (fp32 log-sum-exp per head)
                      + b·4·I (gated MLP: gate, up, act(gate), product) | b·2·I (plain MLP);
                      times layers × rows × seq_len. Eager attention adds (4+b)·a·L² per row
                      and layer. Gradient checkpointing keeps b·h per layer and token (each
                      layer's input) plus one layer's full activations during its recompute.
                      SDPA with packed rows adds its bool mask, rows·L² bytes.
    loss              fused (megamt.kernels, training path with the gradient hint): one logits
                      block nt·V·(b+4) with nt = min(loss_chunk_tokens, 2**26 // V), the fp32
                      gradients kept from forward to backward 4·V·H + 4·N·H, the LM head's
                      gradient b·V·H; unfused: N·V·(b+8) (logits, fp32 copy, log-softmax)
    gathered params   ZeRO-3: b·(V·H + 2·block) -- the LM head (gathered for the whole loss and
                      its backward) and a decoder block with the next one prefetched
    gradient buckets  b·block (a block's full gradients before the reduce-scatter) + the reduce
                      bucket in the communication dtype
    surgery buffers   gradient methods / monitoring steps: 4·T_train·P_t/W ([T_train, n_local] fp32)
optimizer step (transient)
    fp32 gradients    ZeRO-3: 4·min(sub_group_size, P_t/W); ZeRO-1/2: 4·P_t/W (not with offload)

peak = persistent + max(forward/backward, optimizer step). The numbers are estimates of
what the allocator holds (PyTorch's caching allocator and fragmentation add to them); compare
with ``mem/peak_gib`` in TensorBoard after a few steps. ``model.gradient_checkpointing=auto``
uses the same estimate at start-up: on when the peak without it exceeds the device memory.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from typing import Any

from megamt.config import MultitaskConfig
from megamt.model import ENCODER_MODEL_TYPES

GIB = 2 ** 30
RUNTIME_RESERVE = 2 * GIB
"""CUDA context, NCCL and cuBLAS workspaces and allocator fragmentation, not modelled term by term."""
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
ADAM_BYTES = 12  # fp32 master weights + first and second moments, per trainable parameter
DEFAULT_SUB_GROUP = int(1e9)  # DeepSpeed's zero_optimization.sub_group_size default
LOSS_BLOCK_ELEMENTS = 1 << 26  # the fused loss' logits block on CUDA (kernels/fused_linear_cross_entropy.py)


# --------------------------------------------------------------------------- the model's shape


@dataclass
class ModelShape:
    """What the estimate needs to know about the backbone."""

    parameters: int
    trainable: int
    largest_layer: int
    """Parameters of the module with the most parameters of its own (DeepSpeed's "largest layer")."""
    largest_layer_name: str
    layers: int
    hidden: int
    kv_hidden: int
    """Width of the key/value projections (hidden for plain multi-head attention)."""
    intermediate: int
    heads: int
    vocab: int
    gated_mlp: bool
    model_type: str

    @property
    def block_parameters(self) -> int:
        """Parameters of one decoder/encoder block (everything but embeddings and head, per layer)."""
        return max(0, self.parameters - 2 * self.vocab * self.hidden) // max(1, self.layers)


def _first(config, names: tuple[str, ...], default=None):
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return default


def shape_of(module, hf_config) -> ModelShape:
    """The shape of an instantiated backbone (meta device, a real one, or ZeRO-3 partitions,
    which report ``ds_numel``) and its Hugging Face config."""
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    numel = lambda p: int(getattr(p, "ds_numel", p.numel()))  # noqa: E731
    params = list(module.parameters())
    largest, largest_name = 0, ""
    for name, m in module.named_modules():
        n = sum(numel(p) for p in m.parameters(recurse=False))
        if n > largest:
            largest, largest_name = n, name
    hidden = _first(text, ("hidden_size", "n_embd", "d_model", "dim"), 0)
    heads = _first(text, ("num_attention_heads", "n_head", "num_heads"), 1)
    kv_heads = _first(text, ("num_key_value_heads",), heads)
    names = {n.rsplit(".", 1)[-1] for n, _ in module.named_modules()}
    return ModelShape(
        parameters=sum(numel(p) for p in params), trainable=sum(numel(p) for p in params if p.requires_grad),
        largest_layer=largest, largest_layer_name=largest_name,
        layers=_first(text, ("num_hidden_layers", "n_layer", "num_layers"), 1), hidden=hidden,
        kv_hidden=hidden * kv_heads // max(1, heads),
        intermediate=_first(text, ("intermediate_size", "n_inner", "ffn_dim"), None) or 4 * hidden,
        heads=heads, vocab=_first(text, ("vocab_size",), 0),
        gated_mlp=bool(names & {"gate_proj", "w1", "gate_up_proj"}), model_type=str(getattr(text, "model_type", "")))


def model_shape(cfg: MultitaskConfig) -> ModelShape:
    """Count the configured backbone on the ``meta`` device (no memory, no weights read), LoRA
    adapters included when ``model.lora.enabled``."""
    import torch

    from megamt.model import hf_config, resolve_family

    hf = hf_config(cfg.model)
    family = resolve_family(cfg.model, hf)
    with torch.device("meta"):
        if family == "encoder":
            from transformers import AutoModel

            backbone = AutoModel.from_config(hf)
        else:
            from transformers import AutoModelForCausalLM

            backbone = AutoModelForCausalLM.from_config(hf)
        if cfg.model.lora.enabled:
            from megamt.adapters import apply_lora

            backbone = apply_lora(backbone, cfg.model.lora)
    return shape_of(backbone, hf)


# --------------------------------------------------------------------------- the estimate


@dataclass
class Item:
    name: str
    bytes: int
    how: str = ""


@dataclass
class MemoryPlan:
    """The per-GPU budget of one configuration; ``format()`` is what ``megamt plan`` prints."""

    shape: ModelShape
    world_size: int
    gpus_per_node: int
    device_bytes: int
    dtype: str
    zero_stage: int
    offload_optimizer: bool
    offload_param: bool
    comm_dtype: str
    rows: int
    seq_len: int
    grad_accum: int
    gradient_checkpointing: bool
    checkpointing_setting: Any
    persistent: list[Item] = field(default_factory=list)
    forward_backward: list[Item] = field(default_factory=list)
    optimizer_step: list[Item] = field(default_factory=list)
    activations: dict[bool, int] = field(default_factory=dict)
    """Activation bytes of one micro-batch without (False) and with (True) gradient checkpointing."""
    cpu_bytes_per_node: int = 0
    peak_without_checkpointing: int = 0
    suggestions: list[str] = field(default_factory=list)

    @staticmethod
    def _sum(items: list[Item]) -> int:
        return sum(i.bytes for i in items)

    @property
    def peak(self) -> int:
        return self._sum(self.persistent) + max(self._sum(self.forward_backward), self._sum(self.optimizer_step))

    @property
    def model_states(self) -> int:
        """Parameters + gradients + optimizer states on the GPU (what DeepSpeed's estimators count)."""
        return sum(i.bytes for i in self.persistent if i.name != "runtime reserve")

    @property
    def deepspeed_comparable(self) -> int:
        """The terms DeepSpeed's model-state estimators cover: parameters, gradients and optimizer
        states, the gathered working set (their ``4 x largest layer``) and the fp32 gradients of
        the optimizer step (their 4 B/param of fp32 gradients)."""
        extra = {"gathered parameters", "fp32 gradients"}
        return self.model_states + sum(i.bytes for i in self.forward_backward + self.optimizer_step if i.name in extra)

    @property
    def fits(self) -> bool:
        return self.peak <= self.device_bytes

    def format(self) -> str:
        s, W, g = self.shape, self.world_size, self.gpus_per_node
        nodes = max(1, W // max(1, g))
        ckpt = ("on" if self.gradient_checkpointing else "off") + (
            f" (auto: without it the peak is {gib(self.peak_without_checkpointing)} GiB)"
            if self.checkpointing_setting == "auto" else "")
        lines = [
            f"model: {s.model_type}, {s.parameters / 1e9:.2f}B parameters ({s.trainable / 1e9:.3g}B trainable), "
            f"{s.layers} layers, hidden {s.hidden}, vocab {s.vocab}; largest layer {s.largest_layer / 1e6:.0f}M "
            f"({s.largest_layer_name or '-'})",
            f"run: {W} GPUs ({nodes} node(s) x {g}), {gib(self.device_bytes)} GiB each; ZeRO-{self.zero_stage}, "
            f"optimizer on {'CPU' if self.offload_optimizer else 'GPU'}, parameters on "
            f"{'CPU' if self.offload_param else 'GPU'}; {self.dtype}, gradients reduced in {self.comm_dtype}",
            f"micro-batch: {self.rows} row(s) x {self.seq_len} tokens = {self.rows * self.seq_len:,} tokens; "
            f"gradient checkpointing {ckpt}",
            "",
            f"{'per GPU':<44}{'GiB':>9}   how",
        ]

        def block(title: str, items: list[Item]) -> None:
            lines.append(f"{title:<44}{gib(self._sum(items)):>9}")
            for i in items:
                lines.append(f"  {i.name:<42}{gib(i.bytes):>9}   {i.how}")

        block("persistent", self.persistent)
        block("forward/backward of one micro-batch", self.forward_backward)
        block("optimizer step", self.optimizer_step)
        other = not self.gradient_checkpointing
        lines.append(f"  (activations with gradient checkpointing {'on' if other else 'off'}: "
                     f"{gib(self.activations[other])} GiB)")
        lines.append(f"{'peak':<44}{gib(self.peak):>9}   persistent + max(forward/backward, step) "
                     f"of {gib(self.device_bytes)} GiB: "
                     + ("fits" if self.fits else "DOES NOT FIT") + f" ({100 * self.peak / self.device_bytes:.0f}%)")
        if self.cpu_bytes_per_node:
            lines.append(f"CPU memory per node for offloaded states: {gib(self.cpu_bytes_per_node)} GiB")
        if self.suggestions:
            lines += ["", "to make it fit:" if not self.fits else "notes:"] + [f"  - {x}" for x in self.suggestions]
        return "\n".join(lines)


def gib(n: int | float) -> str:
    return f"{n / GIB:.2f}"


def _zero_settings(ds: dict) -> dict:
    zero = ds.get("zero_optimization") or {}
    device = lambda key: str((zero.get(key) or {}).get("device", "none")).lower()  # noqa: E731
    return {"stage": int(zero.get("stage", 0)), "offload_optimizer": device("offload_optimizer") in ("cpu", "nvme"),
            "offload_param": device("offload_param") in ("cpu", "nvme"),
            "reduce_bucket": int(float(zero.get("reduce_bucket_size", 5e8))),
            "prefetch_bucket": int(float(zero.get("stage3_prefetch_bucket_size", 5e7))),
            "sub_group": int(float(zero.get("sub_group_size", DEFAULT_SUB_GROUP))),
            "grad_accum_dtype": str((ds.get("data_types") or {}).get("grad_accum_dtype", "") or "")}


def activation_bytes(shape: ModelShape, rows: int, seq_len: int, dtype_bytes: int, *, checkpointing: bool,
                     attn_implementation: str = "sdpa") -> int:
    """Activations kept for the backward of one micro-batch (see the module docstring)."""
    b, h, n = dtype_bytes, shape.hidden, rows * seq_len
    kv = shape.kv_hidden if attn_implementation == "flash_attention_2" else h
    per_token_layer = (2 * (4 + b) * h + b * (2 * h + 2 * kv) + 4 * shape.heads
                       + b * (4 if shape.gated_mlp else 2) * shape.intermediate)
    per_layer = per_token_layer * n
    if attn_implementation == "eager":
        per_layer += (4 + b) * shape.heads * seq_len * seq_len * rows
    if checkpointing:
        layers = shape.layers * b * h * n + per_layer  # inputs of every layer + one layer recomputed
    else:
        layers = shape.layers * per_layer
    final_norm = (4 + b) * h * n
    mask = rows * seq_len * seq_len if attn_implementation == "sdpa" else 0
    return layers + final_norm + mask


def loss_bytes(shape: ModelShape, rows: int, seq_len: int, dtype_bytes: int, *, fused: bool,
               chunk_tokens: int) -> tuple[int, str]:
    b, n, v, h = dtype_bytes, rows * seq_len, shape.vocab, shape.hidden
    if not fused:
        return n * v * (b + 8), f"unfused: logits [{n}, {v}] in the model dtype, fp32 copy and log-softmax"
    nt = max(1, min(chunk_tokens, LOSS_BLOCK_ELEMENTS // max(1, v), n))
    total = nt * v * (b + 4) + 4 * v * h + 4 * n * h + b * v * h
    return total, (f"fused: logits block {nt} x {v} (+fp32), kept fp32 grads [V,H] + [N,H], LM-head grad")


def plan_memory(cfg: MultitaskConfig, shape: ModelShape, *, world_size: int, device_bytes: int,
                gpus_per_node: int | None = None, ds_config: dict | None = None, dtype: str | None = None,
                grad_accum: int | None = None) -> MemoryPlan:
    """The per-GPU memory budget of ``cfg`` on ``world_size`` devices of ``device_bytes`` each.

    ``dtype``: the resolved model dtype (default: ``model.dtype``, ``auto`` = bf16, the GPU
    choice). ``ds_config``: the resolved DeepSpeed config (default: built from ``cfg``).
    ``model.gradient_checkpointing=auto`` is resolved here (see ``MemoryPlan.gradient_checkpointing``).
    """
    from megamt.ds_config import build_ds_config

    dtype = dtype or (cfg.model.dtype if cfg.model.dtype != "auto" else "bf16")
    gas = grad_accum or (len(cfg.train_task_names) if cfg.gradients.method != "none" else cfg.train.grad_accum)
    if ds_config is None:
        ds_config = build_ds_config(cfg, world_size, grad_accum=gas, hidden_size=shape.hidden or None, dtype=dtype)
    z = _zero_settings(ds_config)
    stage, W = z["stage"], max(1, world_size)
    gpn = gpus_per_node or min(W, 8)
    b = DTYPE_BYTES[dtype]
    comm = str(ds_config.get("communication_data_type") or dtype)
    comm_b = DTYPE_BYTES.get(comm, b)
    gacc_b = DTYPE_BYTES.get({"fp32": "fp32", "float32": "fp32", "bf16": "bf16", "fp16": "fp16"}.get(
        z["grad_accum_dtype"], dtype), b)
    P, Pt = shape.parameters, shape.trainable
    rows, L = cfg.train.micro_batch_size, cfg.data.seq_len
    attn = cfg.model.attn_implementation if cfg.model.attn_implementation != "auto" else "sdpa"
    encoder = cfg.model.family == "encoder" or (cfg.model.family == "auto" and shape.model_type in ENCODER_MODEL_TYPES)

    persistent: list[Item] = []
    cpu_per_rank = 0
    if stage == 3:
        if z["offload_param"]:
            cpu_per_rank += b * P // W
            persistent.append(Item("parameters", 0, f"{dtype} partition 1/{W} on the CPU (offload_param)"))
        else:
            persistent.append(Item("parameters", b * P // W, f"{dtype} partition, 1/{W}"))
    else:
        persistent.append(Item("parameters", b * P, f"{dtype}, a full copy per GPU (ZeRO-{stage})"))
    if z["offload_optimizer"]:
        cpu_per_rank += (4 + ADAM_BYTES) * Pt // W
        persistent.append(Item("gradients", 0, "fp32 partition on the CPU (offload_optimizer)"))
        persistent.append(Item("optimizer states", 0, f"AdamW {ADAM_BYTES} B/param on the CPU (offload_optimizer)"))
    else:
        if stage >= 2:
            persistent.append(Item("gradients", gacc_b * Pt // W, f"{gacc_b} B/param partition, 1/{W}"))
        else:
            persistent.append(Item("gradients", b * Pt, f"{dtype}, full size (ZeRO-{stage})"))
        share = W if stage >= 1 else 1
        persistent.append(Item("optimizer states", ADAM_BYTES * Pt // share,
                               f"AdamW fp32 master + m + v = {ADAM_BYTES} B/param" + (f", 1/{W}" if share > 1 else "")))
    if cfg.meta.method != "none":
        # megamt.gradients.meta: theta0 (+ the batched displacement sum, + inner Adam's m and v), fp32
        # partitions beside the optimizer's fp32 master copy, so on the CPU when that is offloaded
        n_buf = 1 + (cfg.meta.tasks_per_step > 1) + 2 * (cfg.meta.inner_optimizer == "adam")
        what = f"{n_buf} fp32 partition(s) 1/{W} (theta0" + (", displacement sum" if cfg.meta.tasks_per_step > 1 else "") \
            + (", inner Adam m, v" if cfg.meta.inner_optimizer == "adam" else "") + ")"
        if z["offload_optimizer"]:
            cpu_per_rank += 4 * n_buf * Pt // W
            persistent.append(Item("meta-learning buffers", 0, what + " on the CPU (offload_optimizer)"))
        else:
            persistent.append(Item("meta-learning buffers", 4 * n_buf * Pt // W, what))
    persistent.append(Item("runtime reserve", RUNTIME_RESERVE, "CUDA context, NCCL/cuBLAS workspaces, fragmentation"))

    def forward_backward(checkpointing: bool, rows: int = rows) -> list[Item]:
        act = activation_bytes(shape, rows, L, b, checkpointing=checkpointing, attn_implementation=attn)
        items = [Item("activations", act, f"{shape.layers} layers x {rows * L:,} tokens, checkpointing "
                                          f"{'on' if checkpointing else 'off'}, {attn} attention")]
        block = shape.block_parameters
        if encoder:
            items.append(Item("loss", 0, "encoder task heads (small; not modelled)"))
        else:
            loss, how = loss_bytes(shape, rows, L, b, fused=cfg.model.fused_loss, chunk_tokens=cfg.model.loss_chunk_tokens)
            items.append(Item("loss", loss, how))
        if stage == 3:
            head = 0 if encoder else shape.vocab * shape.hidden
            items.append(Item("gathered parameters", b * (head + 2 * block),
                              "ZeRO-3: " + ("" if encoder else "LM head through the loss' backward + ")
                              + "a block and the prefetched next"))
        bucket = min(z["reduce_bucket"], Pt)
        items.append(Item("gradient buckets", b * block + comm_b * bucket,
                          f"a block's {dtype} grads + reduce bucket {bucket:,} x {comm} "))
        if cfg.gradients.method != "none" or cfg.gradients.monitor_every:
            T = len(cfg.train_task_names)
            items.append(Item("surgery buffers", 4 * T * (Pt // W), f"[{T} training tasks, {Pt // W:,}] fp32"))
        return items

    step: list[Item] = []
    if not z["offload_optimizer"] and stage >= 1:
        n = min(z["sub_group"], Pt // W) if stage == 3 else Pt // W
        step.append(Item("fp32 gradients", 4 * n, f"fp32 copy of {n:,} gradient elements "
                                                  + ("(one sub-group)" if stage == 3 else "(the partition)")))

    plan = MemoryPlan(shape=shape, world_size=W, gpus_per_node=gpn, device_bytes=int(device_bytes), dtype=dtype,
                      zero_stage=stage, offload_optimizer=z["offload_optimizer"], offload_param=z["offload_param"],
                      comm_dtype=comm, rows=rows, seq_len=L, grad_accum=gas, gradient_checkpointing=False,
                      checkpointing_setting=cfg.model.gradient_checkpointing, persistent=persistent,
                      optimizer_step=step, cpu_bytes_per_node=cpu_per_rank * gpn)
    plan.activations = {c: forward_backward(c)[0].bytes for c in (False, True)}
    plan.forward_backward = forward_backward(False)
    plan.peak_without_checkpointing = plan.peak
    setting = cfg.model.gradient_checkpointing
    plan.gradient_checkpointing = bool(setting is True or (setting == "auto" and not plan.fits))
    plan.forward_backward = forward_backward(plan.gradient_checkpointing)
    plan.suggestions = suggestions(plan, cfg, forward_backward)
    return plan


def suggestions(plan: MemoryPlan, cfg: MultitaskConfig, forward_backward) -> list[str]:
    """What to change, largest lever first (empty when it fits comfortably)."""
    out: list[str] = []
    if plan.fits:
        return out
    cap = plan.device_bytes
    states = plan._sum(plan.persistent)
    if not plan.gradient_checkpointing:
        with_ckpt = states + max(plan._sum(forward_backward(True)), plan._sum(plan.optimizer_step))
        out.append(f"model.gradient_checkpointing=true (or auto): activations {gib(plan.activations[False])} -> "
                   f"{gib(plan.activations[True])} GiB, peak {gib(with_ckpt)} GiB")
    checkpointing = plan.gradient_checkpointing or plan.checkpointing_setting is not False
    for rows in range(plan.rows - 1, 0, -1):
        if states + max(plan._sum(forward_backward(checkpointing, rows)), plan._sum(plan.optimizer_step)) <= cap:
            accum = math.ceil(plan.rows * plan.grad_accum / rows)
            out.append(f"train.micro_batch_size={rows} train.grad_accum={accum} (about the same tokens per step)"
                       + (" with gradient checkpointing" if checkpointing and not plan.gradient_checkpointing else ""))
            break
    if states > cap:
        out.append(f"the model states alone take {gib(states)} GiB per GPU: "
                   + ("train.ds_config=zero3 partitions parameters and gradients too; " if plan.zero_stage < 3 else "")
                   + ("train.ds_config=zero3_offload moves optimizer states and gradients to CPU RAM; "
                      if not plan.offload_optimizer else "")
                   + f"or more GPUs (states scale as 1/GPUs above {gib(RUNTIME_RESERVE)} GiB of reserve)")
    loss = next((i for i in plan.forward_backward if i.name == "loss"), None)
    if loss is not None and not cfg.model.fused_loss and loss.bytes > 0.1 * cap:
        out.append(f"model.fused_loss=true: the unfused loss holds {gib(loss.bytes)} GiB of logits")
    surgery = next((i for i in plan.forward_backward if i.name == "surgery buffers"), None)
    if surgery is not None and surgery.bytes > 0.1 * cap:
        out.append(f"gradient surgery buffers ([training tasks, partition] fp32) take {gib(surgery.bytes)} GiB on "
                   "measuring steps; they shrink with more GPUs or fewer training tasks "
                   "(gradients.method=none with gradients.monitor_every=0 drops them)")
    return out


def device_memory_bytes(local_world_size: int = 1) -> int:
    """This rank's device memory: the CUDA device's, else the machine's RAM shared by its ranks."""
    import os

    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) // max(1, local_world_size)


# --------------------------------------------------------------------------- DeepSpeed's own estimators


def deepspeed_estimate(plan: MemoryPlan) -> tuple[int, str]:
    """DeepSpeed's model-state estimate per GPU for the same run (bytes) and the function used."""
    nodes = max(1, plan.world_size // plan.gpus_per_node)
    if plan.zero_stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        _, gpu, _ = estimate_zero3_model_states_mem_needs(
            plan.shape.parameters, plan.shape.largest_layer, num_gpus_per_node=plan.gpus_per_node, num_nodes=nodes,
            cpu_offload=plan.offload_optimizer, cpu_offload_params=plan.offload_param, zero_init=True)
        return gpu, "estimate_zero3_model_states_mem_needs"
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    _, gpu = estimate_zero2_model_states_mem_needs(plan.shape.parameters, num_gpus_per_node=plan.gpus_per_node,
                                                   num_nodes=nodes, cpu_offload=plan.offload_optimizer)
    return gpu, "estimate_zero2_model_states_mem_needs"


# --------------------------------------------------------------------------- the command


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="megamt plan", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Exit status: 0 when the run fits, 1 when it does not, 2 on a bad config.")
    p.add_argument("config", help="YAML config (see examples/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.micro_batch_size=2 data.seq_len=4096")
    p.add_argument("--gpus", type=int, default=8, help="GPUs per node (default 8)")
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument("--gpu-mem", type=float, default=None,
                   help="usable memory per GPU in GiB (default: this machine's GPU; required without one)")
    p.add_argument("--deepspeed", action="store_true", help="also print DeepSpeed's own model-state estimate")
    return p.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    from megamt.config import load_command_config

    cfg = load_command_config("megamt plan", args.config, args.overrides)
    if cfg is None:
        return 2
    if cfg.model.name_or_path is None and not cfg.model.from_config:
        print("megamt plan: the config has no model (set model.name_or_path to a local folder or model.from_config)",
              file=sys.stderr)
        return 2
    if args.gpu_mem is None:
        import torch

        if not torch.cuda.is_available():
            print("megamt plan: no GPU on this machine; give the usable memory per GPU with --gpu-mem GiB "
                  "(e.g. --gpu-mem 139 for an H200, 79 for an H100 80GB)", file=sys.stderr)
            return 2
        device = device_memory_bytes()
    else:
        device = int(args.gpu_mem * GIB)
    if args.gpus < 1 or args.nodes < 1:
        print("megamt plan: --gpus and --nodes must be >= 1", file=sys.stderr)
        return 2
    try:
        shape = model_shape(cfg)
    except (OSError, ValueError) as e:
        print(f"megamt plan: cannot read the model's config ({e}); model.name_or_path must be a local folder",
              file=sys.stderr)
        return 2
    plan = plan_memory(cfg, shape, world_size=args.gpus * args.nodes, device_bytes=device, gpus_per_node=args.gpus)
    print(plan.format())
    if args.deepspeed:
        gpu, name = deepspeed_estimate(plan)
        print(f"\nDeepSpeed's {name}: {gib(gpu)} GiB per GPU for parameters, gradients, optimizer states and "
              f"the largest layer; megamt's same terms (persistent states without the reserve + gathered parameters "
              f"+ fp32 step gradients): {gib(plan.deepspeed_comparable)} GiB")
    return 0 if plan.fits else 1


if __name__ == "__main__":
    sys.exit(main())
