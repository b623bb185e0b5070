"""LoRA adapters through ``peft`` on either model family.

- causal LM / encoder-decoder: the whole ``AutoModelForCausalLM`` / ``AutoModelForSeq2SeqLM``
  becomes a ``peft.PeftModel`` (only the LoRA matrices train);
- encoder + heads: the *shared backbone* gets the adapters and is frozen otherwise, the
  per-task heads stay fully trainable (MT-DNN with adapters).

Saving: :func:`save_adapters` writes peft's adapter folder (``adapter_config.json`` +
``adapter_model.safetensors``); :func:`merge_for_export` folds the adapters into the base
weights (``merge_and_unload``) so an exported folder is a plain Hugging Face model.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn


def _peft_config(lora_cfg, task_type: str | None):
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                          target_modules=lora_cfg.target_modules, task_type=task_type)


def _wrap(model: nn.Module, lora_cfg, task_type: str | None):
    from peft import get_peft_model

    try:
        return get_peft_model(model, _peft_config(lora_cfg, task_type))
    except ValueError as e:
        raise ValueError(
            f"model.lora: peft could not place adapters on a {getattr(model.config, 'model_type', '?')} model "
            f"({e}); set model.lora.target_modules to the names of its attention projections") from None


def apply_lora(model: nn.Module, lora_cfg) -> nn.Module:
    """Add LoRA adapters per ``lora_cfg`` (``megamt.config.LoraConfig``); returns the model to use.

    An :class:`megamt.heads.EncoderWithHeads` is modified in place (its backbone wrapped) and
    returned; any other model (a causal LM) is returned wrapped in a ``PeftModel``.
    """
    from megamt.heads import EncoderWithHeads

    if lora_cfg.r < 1:
        raise ValueError(f"model.lora.r: must be >= 1, got {lora_cfg.r}")
    if isinstance(model, EncoderWithHeads):
        model.backbone = _wrap(model.backbone, lora_cfg, None)
        for p in model.heads.parameters():
            p.requires_grad_(True)
        return model
    seq2seq = getattr(getattr(model, "config", None), "is_encoder_decoder", False)
    return _wrap(model, lora_cfg, "SEQ_2_SEQ_LM" if seq2seq else "CAUSAL_LM")


def has_lora(model: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel) or isinstance(getattr(model, "backbone", None), PeftModel)


def save_adapters(model: nn.Module, out_dir: str | Path) -> Path:
    """Write the adapter weights and config (peft's format) to ``out_dir``."""
    from peft import PeftModel

    peft_model = model if isinstance(model, PeftModel) else getattr(model, "backbone", None)
    if not isinstance(peft_model, PeftModel):
        raise ValueError("save_adapters: the model has no LoRA adapters (model.lora.enabled is false)")
    out = Path(out_dir)
    peft_model.save_pretrained(str(out))
    return out


def merge_for_export(model: nn.Module) -> nn.Module:
    """Fold the adapters into the base weights; returns a model without peft wrappers.

    Encoder + heads: the backbone is merged in place and the module returned.
    """
    from peft import PeftModel

    if isinstance(model, PeftModel):
        return model.merge_and_unload()
    if isinstance(getattr(model, "backbone", None), PeftModel):
        model.backbone = model.backbone.merge_and_unload()
    return model


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return train, total
