"""LoRA adapters (peft) on both families: what trains, save/reload, merge for export."""

import pytest
import torch

from megamt.adapters import apply_lora, merge_for_export, save_adapters, trainable_parameters
from megamt.config import LoraConfig
from megamt.heads import EncoderWithHeads

from test_heads import T_CLS, T_NER, example, pack, tiny_config


def _perturb_lora(model):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)


def test_lora_on_encoder_heads_trainable_backbone_frozen(tmp_path):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = EncoderWithHeads(tiny_config()).eval()
    batch = pack([[example(T_CLS, 5, gen), example(T_NER, 6, gen)]], L=12)
    with torch.no_grad():
        before = model.encode(batch)
    apply_lora(model, LoraConfig(enabled=True, r=4, alpha=8, target_modules=["query", "value"]))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in names) and all(n.startswith("heads.") or "lora_" in n for n in names)
    assert all(p.requires_grad for p in model.heads.parameters())
    with torch.no_grad():  # LoRA B starts at zero: the function is unchanged
        assert torch.allclose(model.encode(batch), before, atol=1e-6)
    _perturb_lora(model)
    with torch.no_grad():
        adapted = model.encode(batch)
    assert not torch.allclose(adapted, before, atol=1e-4)
    save_adapters(model, tmp_path / "adapters")
    assert (tmp_path / "adapters" / "adapter_config.json").is_file()
    merge_for_export(model)
    assert not any("lora_" in n for n, _ in model.named_parameters())
    with torch.no_grad():
        assert torch.allclose(model.encode(batch), adapted, atol=1e-5)


def test_lora_on_causal_lm_save_reload_merge(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    base = AutoModelForCausalLM.from_config(cfg)
    base.save_pretrained(tmp_path / "base")
    model = apply_lora(base, LoraConfig(enabled=True, r=4, alpha=8)).eval()
    train, total = trainable_parameters(model)
    assert 0 < train < total / 10
    _perturb_lora(model)
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
    save_adapters(model, tmp_path / "adapters")
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                                         str(tmp_path / "adapters")).eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, adapted, atol=1e-5)
    merged = merge_for_export(model)
    assert type(merged).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, adapted, atol=1e-5)


def test_lora_bad_target_modules_say_what_to_do():
    model = EncoderWithHeads(tiny_config())
    with pytest.raises(ValueError, match="target_modules"):
        apply_lora(model, LoraConfig(enabled=True, r=4, target_modules=["no_such_proj"]))


def test_lora_switched_on_in_config_saved_and_reloaded(tmp_path):
    from megamt.model import MultitaskModel

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(5)
    cfg = tiny_config()
    cfg.model.family = "encoder"
    cfg.model.lora.enabled, cfg.model.lora.r, cfg.model.lora.target_modules = True, 4, ["query", "value"]
    model = MultitaskModel(cfg).eval()
    assert any("lora_A" in n for n, p in model.named_parameters() if p.requires_grad)
    _perturb_lora(model)
    batch = pack([[example(T_CLS, 5, gen), example(T_NER, 6, gen)]], L=12)
    with torch.no_grad():
        before = model(batch).loss_sum
    model.save_pretrained(tmp_path / "export")
    assert (tmp_path / "export" / "adapter" / "adapter_config.json").is_file()
    again = MultitaskModel.from_pretrained(tmp_path / "export").eval()  # merged weights + heads
    with torch.no_grad():
        assert torch.allclose(again(batch).loss_sum, before, atol=1e-5)
