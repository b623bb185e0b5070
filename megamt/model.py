"""MultitaskModel: one shared backbone, a per-task loss in its forward.

``MultitaskModel(config)`` holds

* ``causal_lm`` family: any ``AutoModelForCausalLM`` (GPT-2, Llama, Qwen, Mistral ...), from
  a local folder (``model.name_or_path``) or built from a config (``model.from_config``);
* ``encoder`` family: ``megamt.heads.EncoderWithHeads`` (an ``AutoModel`` + task heads);
* ``seq2seq`` family: any ``AutoModelForSeq2SeqLM`` megamt packs (T5, FLAN-T5, mT5, BART,
  mBART); packed prompts to the encoder, targets to the decoder (megamt/seq2seq.py).

``forward(batch) -> TaskLoss`` (``loss_sum[T]``, ``count[T]``, see megamt/losses.py). Packed
batches pass ``position_ids`` (restarting per example), ``use_cache=False`` and the packer's
``cu_seqlens`` / ``max_seqlen`` to megamt's packed attention (megamt/attention.py): examples
never attend to each other, on every implementation and for any number of rows.

No parallelism here: the trainer builds this module under ``deepspeed.zero.Init`` (through
transformers' ``HfDeepSpeedConfig``) and wraps it in the engine. The one ZeRO-3 concern
that must live in the module is the fused loss reading ``lm_head.weight`` outside
``lm_head.forward``: the loss runs in a small child module (``self.lm_loss``,
``megamt.losses.LMHeadTaskLoss``) and the weight is registered as an *external parameter* of
that child, so ZeRO-3 gathers it for the loss' forward and backward only (Liger-Kernel #1048).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
from torch import nn

from megamt.attention import (construction_kwargs, packed_attention_kwargs, packed_forward, resolve_implementation,
                              switch_to_packed_attention)
from megamt.config import MultitaskConfig, ModelConfig, load_config
from megamt.losses import LMHeadTaskLoss, TaskLoss, task_cross_entropy, task_cross_entropy_from_hidden

ENCODER_MODEL_TYPES = {
    "bert", "roberta", "xlm-roberta", "deberta", "deberta-v2", "electra", "distilbert", "albert",
    "mpnet", "modernbert", "camembert", "ernie", "xlm", "nomic_bert", "jina_bert",
}
CONFIG_FILE = "megamt_config.yaml"


def resolve_dtype(model_cfg: ModelConfig) -> torch.dtype:
    """auto: bf16 on CUDA, fp32 on the CPU."""
    if model_cfg.dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[model_cfg.dtype]


def hf_config(model_cfg: ModelConfig):
    """The Hugging Face config of the backbone (from the folder, or built from ``from_config``)."""
    from transformers import AutoConfig

    from megamt.config import ConfigError

    problems = model_cfg.problems("model")
    if problems:
        raise ConfigError(problems)
    if model_cfg.name_or_path:
        return AutoConfig.from_pretrained(model_cfg.name_or_path)
    keys = dict(model_cfg.from_config)
    return AutoConfig.for_model(keys.pop("model_type"), **keys)


def resolve_family(model_cfg: ModelConfig, config=None) -> str:
    """auto: seq2seq when the config says ``is_encoder_decoder``, encoder for encoder-only
    architectures (BERT-like), else causal_lm."""
    if model_cfg.family != "auto":
        return model_cfg.family
    config = config if config is not None else hf_config(model_cfg)
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs):
        return "causal_lm"
    return "encoder" if config.model_type in ENCODER_MODEL_TYPES else "causal_lm"


def build_causal_lm(model_cfg: ModelConfig, config=None):
    """``AutoModelForCausalLM`` from a local folder or a config, switched to megamt's packed
    attention (megamt/attention.py). Under an alive ``HfDeepSpeedConfig`` with ZeRO-3,
    transformers builds it inside ``deepspeed.zero.Init``."""
    from transformers import AutoModelForCausalLM

    kwargs = dict(dtype=resolve_dtype(model_cfg), **construction_kwargs(model_cfg.attn_implementation))
    if model_cfg.name_or_path:
        model = AutoModelForCausalLM.from_pretrained(model_cfg.name_or_path, **kwargs)
    else:
        model = AutoModelForCausalLM.from_config(config if config is not None else hf_config(model_cfg), **kwargs)
    switch_to_packed_attention(model, model_cfg.attn_implementation)
    return model


def config_source(model_cfg: ModelConfig) -> str:
    """Where the backbone's config comes from, for error messages."""
    if model_cfg.name_or_path:
        return f"model.name_or_path={model_cfg.name_or_path} ({model_cfg.name_or_path}/config.json)"
    return "model.from_config"


def build_seq2seq(config: MultitaskConfig):
    """An encoder-decoder backbone (megamt/seq2seq.py), its config and tokenizer checked."""
    from megamt import seq2seq

    mcfg = config.model
    hf = hf_config(mcfg)
    where = config_source(mcfg)
    seq2seq.check_seq2seq_config(hf, where)
    seq2seq.check_tokenizer_fits(config.data.tokenizer, hf, where)
    return seq2seq.build_seq2seq_lm(mcfg, hf, resolve_implementation(mcfg.attn_implementation), resolve_dtype(mcfg), where)


class ModuleCall(NamedTuple):
    """``fn(*args, **kwargs)`` run inside :meth:`MultitaskModel.forward` (megamt.eval routes its
    forwards through the root module this way). Under ZeRO-3 each call of the engine's root
    module starts a step of the parameter coordinator, whose recorded module order drives the
    prefetching of gathered parameters -- as transformers' ``generate`` calls the root model
    once per decoding step."""

    fn: Callable
    args: tuple = ()
    kwargs: dict = {}


class MultitaskModel(nn.Module):
    """The shared backbone with the per-task loss of every task in ``config.tasks``."""

    def __init__(self, config: MultitaskConfig, backbone: nn.Module | None = None):
        super().__init__()
        self.config = config
        self.task_names = list(config.tasks)
        self.num_tasks = len(self.task_names)
        mcfg = config.model
        if backbone is not None:
            self.family = "seq2seq" if getattr(backbone.config, "is_encoder_decoder", False) else "causal_lm"
        else:
            self.family = resolve_family(mcfg)
        if self.family == "encoder":
            from megamt.heads import EncoderWithHeads  # owned by the eval part

            self.backbone = EncoderWithHeads(config)
        elif self.family == "seq2seq":
            from megamt import seq2seq

            if backbone is None:
                backbone = build_seq2seq(config)
            else:
                seq2seq.check_seq2seq_config(backbone.config, f"the backbone passed to MultitaskModel")
                seq2seq.switch_to_packed_attention(backbone, resolve_implementation(mcfg.attn_implementation, backbone))
            self.backbone = backbone
            self.backbone.config.use_cache = False
        else:
            if backbone is None:
                backbone = build_causal_lm(mcfg)
            else:
                switch_to_packed_attention(backbone, mcfg.attn_implementation)
            self.backbone = backbone
            self.backbone.config.use_cache = False
        if mcfg.lora.enabled:
            from megamt.adapters import apply_lora

            self.backbone = apply_lora(self.backbone, mcfg.lora)
        self.gradient_checkpointing = False
        if mcfg.gradient_checkpointing is True:  # "auto" is decided by the trainer (megamt.plan)
            self.enable_gradient_checkpointing()
        self.rep_grad_norms = None  # megamt.gradients.representation, see track_representation_grad_norms
        self.fused_loss = bool(mcfg.fused_loss) and self.family != "encoder" and _kernels_available()
        # the fused loss as a child module, so that ZeRO-3 gathers the LM head around it only
        self.lm_loss = LMHeadTaskLoss(self.num_tasks, mcfg.loss_chunk_tokens) if self.fused_loss else None
        if self.fused_loss:
            self._register_head_as_external_parameter()

    # ----------------------------------------------------------------- forward
    def forward(self, batch: dict[str, Any] | "ModuleCall") -> TaskLoss:
        if isinstance(batch, ModuleCall):  # evaluation (megamt.eval): a call routed through this module
            return batch.fn(*batch.args, **batch.kwargs)
        if self.rep_grad_norms is not None:
            self.rep_grad_norms.set_task_ids(batch["task_ids"])
        if self.family == "encoder":
            return self.backbone(batch)
        if self.family == "seq2seq":  # the decoder's hidden states against the LM head (megamt/seq2seq.py)
            from megamt import seq2seq

            weight, bias, scale = seq2seq.lm_head(self.backbone)
            hidden = seq2seq.packed_decoder_states(self.backbone, batch)
            hidden = hidden * scale if scale != 1.0 else hidden
            if self.fused_loss:
                return self.lm_loss(hidden, head=self.backbone.get_output_embeddings(), bias=bias,
                                    labels=batch["labels"], task_ids=batch["task_ids"],
                                    grad_scale_hint=batch.get("loss_grad_scale"))
            return task_cross_entropy_from_hidden(hidden, weight, batch["labels"], batch["task_ids"], self.num_tasks,
                                                  bias=bias, fused=False, chunk_tokens=self.config.model.loss_chunk_tokens)
        if self.fused_loss:
            hidden = self.hidden_states(batch)
            return self.lm_loss(hidden, head=self.backbone.get_output_embeddings(), labels=batch["labels"],
                                task_ids=batch["task_ids"], grad_scale_hint=batch.get("loss_grad_scale"))
        return task_cross_entropy(self.logits(batch), batch["labels"], batch["task_ids"], self.num_tasks)

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each layer's activations in the backward (non-reentrant: ZeRO-3's hooks see it)."""
        hf_model = self.backbone.backbone if self.family == "encoder" else self.backbone  # heads: no layers
        kwargs = {"use_reentrant": False}
        if hasattr(hf_model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name warns
            hf_model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        self.gradient_checkpointing = True

    def shared_trunk(self) -> torch.nn.Module:
        """The module whose output is the last representation every task shares: the
        decoder (causal LMs, before the LM head) or the encoder (before the task heads)."""
        return self.backbone.backbone if self.family == "encoder" else self.backbone.get_decoder()

    def track_representation_grad_norms(self, collector) -> None:
        """Have ``collector`` (``RepresentationGradNorms``) see every forward's trunk output
        with the batch's ``task_ids``: per-task gradient norms from the one mixed backward."""
        collector.attach(self.shared_trunk())
        self.rep_grad_norms = collector

    def hidden_states(self, batch: dict[str, Any]) -> torch.Tensor:
        """Last hidden states ``[B, L, H]`` of the decoder (no LM head), examples isolated."""
        if self.family == "seq2seq":
            from megamt.seq2seq import packed_decoder_states

            return packed_decoder_states(self.backbone, batch)
        decoder = self.backbone.get_decoder()
        with packed_forward():
            return decoder(**self.packed_inputs(batch))[0]

    def logits(self, batch: dict[str, Any]) -> torch.Tensor:
        """Full-vocabulary logits ``[B, L, V]`` of a packed batch (examples isolated)."""
        if self.family == "seq2seq":
            from megamt.seq2seq import packed_logits

            return packed_logits(self.backbone, batch)
        with packed_forward():
            return self.backbone(**self.packed_inputs(batch)).logits

    def packed_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The backbone's keyword arguments for a packed batch: restarting ``position_ids``, no
        cache, and the packer's segment boundaries for megamt's attention (megamt/attention.py)."""
        kwargs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
        if _uses_packed_attention(self.backbone):
            kwargs.update(packed_attention_kwargs(batch))
        return kwargs

    def _register_head_as_external_parameter(self) -> None:
        # The fused loss reads lm_head.weight (tied or not) in self.lm_loss's forward, not in
        # lm_head.forward. Registered as an external parameter of that small module, ZeRO-3
        # gathers it around its forward and backward and releases it right after its backward
        # (on this root module it stayed gathered for the whole backward); without ZeRO-3 the
        # registration is inert.
        self.lm_loss.register_head(self.backbone.get_output_embeddings())

    # ----------------------------------------------------------------- evaluation
    def evaluate(self, *args, **kwargs):
        """Per-task metrics; see :func:`megamt.eval.api.evaluate`."""
        from megamt.eval import api

        return api.evaluate(self, *args, **kwargs)

    def evaluate_zero_shot(self, *args, **kwargs):
        """Metrics on tasks held out of training; see :func:`megamt.eval.api.evaluate_zero_shot`."""
        from megamt.eval import api

        return api.evaluate_zero_shot(self, *args, **kwargs)

    def adapt(self, spec, task: str, **kwargs):
        """Few-shot adaptation curves on ``task`` of ``spec``; see :func:`megamt.eval.adapt.adapt`."""
        from megamt.eval import adapt

        return adapt.adapt(self, spec, task, **kwargs)

    # ----------------------------------------------------------------- save / load
    def save_pretrained(self, out_dir: str | Path, tokenizer_dir: str | None = None) -> Path:
        """Write a Hugging Face folder of the backbone (+ tokenizer) and megamt's config.

        For a model not partitioned by ZeRO-3. Trained ZeRO-3 runs: ``megamt export``.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(out)
        save_megamt_config(self.config, out, tokenizer_dir)
        return out

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "MultitaskModel":
        """Load an exported folder (``megamt export``), a run directory or a checkpoint folder."""
        path = Path(path)
        if (path / "config.json").is_file():
            cfg = _load_saved_config(path)
            cfg.model.name_or_path, cfg.model.from_config = str(path), {}
            return cls(cfg)
        from megamt.export import load_trained_model

        model, _ = load_trained_model(path)
        return model


def _uses_packed_attention(backbone) -> bool:
    from megamt.attention import PACKED_NAMES

    config = getattr(backbone, "config", None)
    return getattr(config, "_attn_implementation", None) in PACKED_NAMES.values()


def _is_tied(model: MultitaskModel, name: str) -> bool:
    tied = getattr(model.backbone, "_tied_weights_keys", None) or {}
    short = name.removeprefix("backbone.")
    return short in tied or (model.backbone.config.tie_word_embeddings and "lm_head" in short)


def _kernels_available() -> bool:
    try:
        from megamt.kernels import fused_linear_task_cross_entropy  # noqa: F401
    except ImportError:
        return False
    return True


def save_megamt_config(config: MultitaskConfig, out: Path, tokenizer_dir: str | None = None) -> None:
    (out / CONFIG_FILE).write_text(config.to_yaml())
    tok = tokenizer_dir or config.data.tokenizer
    if tok and Path(tok).is_dir():
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(tok).save_pretrained(out)


def _load_saved_config(path: Path) -> MultitaskConfig:
    if (path / CONFIG_FILE).is_file():
        return load_config(path / CONFIG_FILE)
    # a plain HF folder: a model-only config (no tasks)
    return MultitaskConfig(model=ModelConfig(name_or_path=str(path)))


def describe(model: nn.Module) -> dict:
    """Parameter counts for the start-up print (ZeRO-3 partitions report ``ds_numel``)."""
    total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
    return {"parameters": total, "trainable": trainable}


__all__ = ["ModuleCall", "MultitaskModel", "TaskLoss", "build_causal_lm", "build_seq2seq", "resolve_family", "describe"]
