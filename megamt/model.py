"""MultitaskModel: one shared backbone, a per-task loss in its forward.

``MultitaskModel(config)`` holds

* ``causal_lm`` family: any ``AutoModelForCausalLM`` (GPT-2, Llama, Qwen, Mistral ...), from
  a local folder (``model.name_or_path``) or built from a config (``model.from_config``);
* ``encoder`` family: ``megamt.heads.EncoderWithHeads`` (an ``AutoModel`` + task heads).

``forward(batch) -> TaskLoss`` (``loss_sum[T]``, ``count[T]``, see megamt/losses.py). Packed
batches always pass ``position_ids`` and ``use_cache=False``: that is what keeps packed
examples from attending to each other (FIELD_NOTES).

No parallelism here: the trainer builds this module under ``deepspeed.zero.Init`` (through
transformers' ``HfDeepSpeedConfig``) and wraps it in the engine. The one ZeRO-3 concern
that must live in the module is the fused loss reading ``lm_head.weight`` outside
``lm_head.forward``: the weight is registered as an *external parameter* of this module,
so ZeRO-3 gathers it for this module's forward and backward (Liger-Kernel #1048).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from megamt.config import MultitaskConfig, ModelConfig, load_config
from megamt.losses import TaskLoss, task_cross_entropy, task_cross_entropy_from_hidden

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


def resolve_attn_implementation(model_cfg: ModelConfig) -> str:
    """auto: flash_attention_2 when flash-attn is installed and CUDA is present, else sdpa."""
    if model_cfg.attn_implementation != "auto":
        return model_cfg.attn_implementation
    if torch.cuda.is_available():
        import importlib.util

        if importlib.util.find_spec("flash_attn") is not None:
            return "flash_attention_2"
    return "sdpa"


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
    """auto: encoder for encoder-only architectures (BERT-like), else causal_lm."""
    if model_cfg.family != "auto":
        return model_cfg.family
    config = config if config is not None else hf_config(model_cfg)
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs):
        return "causal_lm"
    return "encoder" if config.model_type in ENCODER_MODEL_TYPES else "causal_lm"


def build_causal_lm(model_cfg: ModelConfig, config=None):
    """``AutoModelForCausalLM`` from a local folder or a config. Under an alive
    ``HfDeepSpeedConfig`` with ZeRO-3, transformers builds it inside ``deepspeed.zero.Init``."""
    from transformers import AutoModelForCausalLM

    kwargs = dict(attn_implementation=resolve_attn_implementation(model_cfg), dtype=resolve_dtype(model_cfg))
    if model_cfg.name_or_path:
        return AutoModelForCausalLM.from_pretrained(model_cfg.name_or_path, **kwargs)
    return AutoModelForCausalLM.from_config(config if config is not None else hf_config(model_cfg), **kwargs)


class MultitaskModel(nn.Module):
    """The shared backbone with the per-task loss of every task in ``config.tasks``."""

    def __init__(self, config: MultitaskConfig, backbone: nn.Module | None = None):
        super().__init__()
        self.config = config
        self.task_names = list(config.tasks)
        self.num_tasks = len(self.task_names)
        mcfg = config.model
        self.family = "causal_lm" if backbone is not None else resolve_family(mcfg)
        if self.family == "encoder":
            from megamt.heads import EncoderWithHeads  # owned by the eval part

            self.backbone = EncoderWithHeads(config)
        else:
            self.backbone = backbone if backbone is not None else build_causal_lm(mcfg)
            self.backbone.config.use_cache = False
        if mcfg.lora.enabled:
            from megamt.adapters import apply_lora

            self.backbone = apply_lora(self.backbone, mcfg.lora)
        if mcfg.gradient_checkpointing:
            self.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.rep_grad_norms = None  # megamt.gradients.representation, see track_representation_grad_norms
        self.fused_loss = bool(mcfg.fused_loss) and self.family == "causal_lm" and _kernels_available()
        if self.fused_loss:
            self._register_head_as_external_parameter()

    # ----------------------------------------------------------------- forward
    def forward(self, batch: dict[str, Any]) -> TaskLoss:
        if self.rep_grad_norms is not None:
            self.rep_grad_norms.set_task_ids(batch["task_ids"])
        if self.family == "encoder":
            return self.backbone(batch)
        if self.fused_loss:
            hidden = self.hidden_states(batch)
            head = self.backbone.get_output_embeddings()
            return task_cross_entropy_from_hidden(
                hidden, head.weight, batch["labels"], batch["task_ids"], self.num_tasks,
                bias=getattr(head, "bias", None), fused=True, chunk_tokens=self.config.model.loss_chunk_tokens,
                grad_scale_hint=batch.get("loss_grad_scale"))
        return task_cross_entropy(self.logits(batch), batch["labels"], batch["task_ids"], self.num_tasks)

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
        """Last hidden states ``[B, L, H]`` of the decoder (no LM head)."""
        decoder = self.backbone.get_decoder()
        out = decoder(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
        return out[0]

    def logits(self, batch: dict[str, Any]) -> torch.Tensor:
        """Full-vocabulary logits ``[B, L, V]`` of a packed batch (examples isolated)."""
        out = self.backbone(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
        return out.logits

    def _register_head_as_external_parameter(self) -> None:
        # The fused loss reads lm_head.weight (tied or not) in *this* module's forward, not in
        # lm_head.forward. Registering it tells ZeRO-3 to gather it around this module's
        # forward and backward; without ZeRO-3 the registration is inert.
        try:
            from deepspeed.zero import register_external_parameter
        except ImportError:
            return
        register_external_parameter(self, self.backbone.get_output_embeddings().weight)

    # ----------------------------------------------------------------- evaluation
    def evaluate(self, *args, **kwargs):
        """Per-task metrics; see :func:`megamt.eval.api.evaluate`."""
        from megamt.eval import api

        return api.evaluate(self, *args, **kwargs)

    def evaluate_zero_shot(self, *args, **kwargs):
        """Metrics on tasks held out of training; see :func:`megamt.eval.api.evaluate_zero_shot`."""
        from megamt.eval import api

        return api.evaluate_zero_shot(self, *args, **kwargs)

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


__all__ = ["MultitaskModel", "TaskLoss", "build_causal_lm", "resolve_family", "describe"]
