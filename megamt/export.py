"""`megamt export CHECKPOINT OUT_DIR`: a Hugging Face model folder from a megamt checkpoint.

CHECKPOINT is a run directory, its ``checkpoints/`` folder (the ``latest`` one is used) or
one checkpoint folder (``.../checkpoints/step_00000100``). The ZeRO partitions are gathered
into one fp32 state dict by DeepSpeed's own ``get_fp32_state_dict_from_zero_checkpoint``
(what ``zero_to_fp32.py`` runs; no ranks are launched), loaded into the model built from the
checkpoint's saved config, and written with ``save_pretrained`` together with the tokenizer
and ``megamt_config.yaml``::

    AutoModelForCausalLM.from_pretrained(OUT_DIR)      # causal LMs
    MultitaskModel.from_pretrained(OUT_DIR)            # any family, with its task heads
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

CONFIG_FILE = "megamt_config.yaml"


def gather_fp32_state_dict(ckpt_root: str | Path, tag: str) -> dict[str, torch.Tensor]:
    """One fp32 state dict of the whole model from the ZeRO-2/3 partitions of a checkpoint."""
    import logging

    from deepspeed.utils import logger as ds_logger
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ds_logger.setLevel(logging.WARNING)
    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_root), tag=tag)


def load_trained_model(checkpoint: str | Path):
    """(MultitaskModel with the checkpoint's weights, checkpoint folder)."""
    from megamt.checkpoint import find_checkpoint
    from megamt.config import load_config
    from megamt.model import MultitaskModel, _is_tied

    root, tag = find_checkpoint(checkpoint)
    if root is None:
        raise FileNotFoundError(f"{checkpoint}: no megamt checkpoint here (expected a run directory, its "
                                f"checkpoints/ folder with a `latest` file, or a step_* folder)")
    folder = root / tag
    if not (folder / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{folder / CONFIG_FILE}: missing; not a megamt checkpoint (DeepSpeed-only "
                                f"checkpoints: run their zero_to_fp32.py)")
    cfg = load_config(folder / CONFIG_FILE)
    model = MultitaskModel(cfg)
    state = gather_fp32_state_dict(root, tag)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not _is_tied(model, m)]
    if missing or unexpected:
        raise RuntimeError(f"{folder}: checkpoint weights do not match the model built from its config "
                           f"(missing: {missing[:5]}, unexpected: {unexpected[:5]})")
    if hasattr(model.backbone, "tie_weights"):
        model.backbone.tie_weights()
    return model.eval(), folder


def export(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Write the HF folder (+ tokenizer, megamt config); returns it."""
    from megamt.model import save_megamt_config

    from megamt.outputs import ensure_writable

    out = ensure_writable(out_dir, "OUT_DIR", "Choose a writable folder with enough space for the model")
    model, folder = load_trained_model(checkpoint)
    if model.family == "encoder":
        model.save_pretrained(out)  # encoder + heads in the heads module's format (merges LoRA itself)
    else:
        backbone = model.backbone
        if model.config.model.lora.enabled:
            from megamt.adapters import merge_for_export

            backbone = merge_for_export(backbone)
        backbone.save_pretrained(out)
        cfg = model.config
        cfg.model.lora.enabled = False  # merged
        save_megamt_config(cfg, out)
    (out / "EXPORTED_FROM").write_text(str(folder.resolve()) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="megamt export", description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="run directory, its checkpoints/ folder, or a step_* checkpoint folder")
    ap.add_argument("out_dir", help="output Hugging Face model folder")
    args = ap.parse_args(argv)
    try:
        out = export(args.checkpoint, args.out_dir)
    except (FileNotFoundError, RuntimeError) as e:  # OutputDirError is a RuntimeError
        print(f"megamt export: error: {e}", file=sys.stderr)
        return 1
    loader = ("MultitaskModel.from_pretrained, the encoder with its task heads; the encoder alone: "
              "AutoModel.from_pretrained(OUT, add_pooling_layer=False) -- megamt trains no pooler"
              if (out / "heads.json").is_file() else
              "AutoModelForCausalLM.from_pretrained (or MultitaskModel.from_pretrained)")
    print(f"exported {args.checkpoint} -> {out} (load with {loader})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
