"""Tiny random-weight model pairs built from configs: what the tests and the offline demo run on.

The draft is the target with its weights perturbed (`noise`): small noise gives a draft that mostly
agrees with the target, large noise one that rarely does, noise 0 one that always does.
"""
from __future__ import annotations

import string
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config

SPECIALS = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_tokenizer(vocab_size: int = 128) -> PreTrainedTokenizerFast:
    """One token per printable character, plus chat specials; padded to `vocab_size`."""
    chars = [c for c in string.printable if c not in "\t\r\x0b\x0c"]
    tokens = (SPECIALS + chars)[:vocab_size]
    tokens += [f"<extra_{i}>" for i in range(vocab_size - len(tokens))]
    core = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="<|endoftext|>",
                                  additional_special_tokens=SPECIALS[2:])
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_config(arch: str = "llama", layers: int = 4, vocab_size: int = 128, hidden: int = 64,
                max_positions: int = 4096):
    if arch == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=4, n_positions=max_positions,
                          bos_token_id=1, eos_token_id=1)
    cls = Qwen2Config if arch == "qwen2" else LlamaConfig
    return cls(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
               tie_word_embeddings=(arch == "qwen2"), bos_token_id=1, eos_token_id=1)


def build_model(config, seed: int, scale: float = 1.0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # sharper logits than the default init, so greedy text is less flat
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(scale)
    return model


def perturbed(model, noise: float, seed: int):
    draft = AutoModelForCausalLM.from_config(model.config).eval()
    draft.load_state_dict(model.state_dict())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * noise * p.std().clamp(min=1e-3))
    return draft


def truncated(model, layers: int):
    """The target's first `layers` layers with its own norm and head: a cheap draft that agrees
    with the target as often as its logit lens at that depth does."""
    data = {**model.config.to_dict(), "num_hidden_layers": layers, "n_layer": layers}
    if data.get("layer_types"):   # Qwen2 configs list one attention type per layer
        data["layer_types"] = data["layer_types"][:layers]
    config = model.config.__class__.from_dict(data)
    draft = AutoModelForCausalLM.from_config(config).eval()
    draft.load_state_dict(model.state_dict(), strict=False)
    return draft


def make_disagreeing(target, draft, token: int = 0) -> None:
    """Make `draft` always propose `token` and `target` never choose it: a draft that never agrees.
    The draft's final norm is zeroed, so all its logits are 0 and argmax is token 0; the target's
    head row for that token is zeroed, so its logit 0 loses to the (positive) maximum of the others."""
    assert token == 0, "argmax of all-zero logits is token 0"
    with torch.no_grad():
        for p in draft.get_output_embeddings().parameters():
            p.zero_()
        target.get_output_embeddings().weight[token].zero_()


def build_tiny_pair(folder: Path, arch: str = "llama", target_layers: int = 4, draft_layers: int | None = None,
                    noise: float = 0.3, seed: int = 0, vocab_size: int = 128,
                    disagree: bool = False, hidden: int = 64, draft_from_target: bool = False) -> tuple[Path, Path]:
    """Save a target and a draft checkpoint (with the tiny tokenizer) under `folder`."""
    folder = Path(folder)
    tok = tiny_tokenizer(vocab_size)
    target = build_model(tiny_config(arch, target_layers, vocab_size, hidden), seed, scale=3.0)
    if draft_layers is None:
        draft = perturbed(target, noise, seed + 1)
    elif draft_from_target:
        draft = truncated(target, draft_layers)
    else:
        draft = build_model(tiny_config(arch, draft_layers, vocab_size, hidden), seed + 1, scale=3.0)
    if disagree:
        make_disagreeing(target, draft)
    paths = []
    for name, model in (("target", target), ("draft", draft)):
        path = folder / name
        model.save_pretrained(path)
        tok.save_pretrained(path)
        paths.append(path)
    return paths[0], paths[1]
