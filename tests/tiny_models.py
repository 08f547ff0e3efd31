"""Tiny random HF reference models (torch) saved as safetensors directories, for exact parity tests."""
from __future__ import annotations

from pathlib import Path

import numpy as np

QWEN2_SHAPES = {
    "gqa2_untied": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, tie_word_embeddings=False),
    "gqa1_tied": dict(hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=6,
                      num_key_value_heads=1, tie_word_embeddings=True),
    "mha_odd": dict(hidden_size=36, intermediate_size=50, num_hidden_layers=2, num_attention_heads=3,
                    num_key_value_heads=3, tie_word_embeddings=False),
}


def make_hf_model(directory: Path, arch: str = "qwen2", seed: int = 0, vocab_size: int = 151, **overrides):
    """Build a random HF model with non-trivial biases/norms, save it to `directory`, return the torch model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    base = dict(vocab_size=vocab_size, max_position_embeddings=256, rms_norm_eps=1e-6, bos_token_id=1,
                eos_token_id=2, pad_token_id=0)
    base.update(QWEN2_SHAPES["gqa2_untied"])
    base.update(overrides)
    cls = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}[arch]
    model = cls[1](cls[0](**base)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(str(directory))
    return model


def hf_logits(model, ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """HF logits with explicit position ids that skip left padding (as HF generate computes them)."""
    import torch

    mask = np.ones_like(ids, dtype=bool) if mask is None else mask
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        out = model(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask.astype(np.int64)),
                    position_ids=torch.tensor(positions, dtype=torch.long))
    return out.logits.float().numpy()


def left_padded_batch(rng: np.random.Generator, lengths: list[int], vocab: int, pad_id: int = 0):
    width = max(lengths)
    ids = np.full((len(lengths), width), pad_id, np.int32)
    mask = np.zeros((len(lengths), width), bool)
    for i, n in enumerate(lengths):
        ids[i, width - n:] = rng.integers(3, vocab, size=n)
        mask[i, width - n:] = True
    return ids, mask


def max_relative_error(actual: np.ndarray, expected: np.ndarray, mask: np.ndarray | None = None) -> float:
    if mask is not None:
        actual, expected = actual[mask], expected[mask]
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def byte_level_tokenizer(bos: str = "<bos>", eos: str = "<eos>", special: tuple[str, ...] = ()):
    """A byte-level tokenizer (any text encodes exactly): ids 0, 1, 2 = <pad>, `bos`, `eos`, then the 256 bytes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, bos: 1, eos: 2}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    extra = {"additional_special_tokens": list(special)} if special else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token=bos, eos_token=eos, **extra)


def byte_chat_tokenizer():
    """A byte-level tokenizer with ChatML special tokens and template, like SmolLM2's."""
    fast = byte_level_tokenizer("<|im_start|>", "<|im_end|>", special=("<|im_start|>", "<|im_end|>"))
    fast.chat_template = CHATML
    return fast


def make_tiny_chat_model(directory: Path, seed: int = 0):
    """A tiny random Llama (HF directory) with the byte-level ChatML tokenizer; returns the torch model."""
    tokenizer = byte_chat_tokenizer()
    model = make_hf_model(directory, "llama", seed=seed, vocab_size=len(tokenizer), max_position_embeddings=4096,
                          bos_token_id=1, eos_token_id=2, pad_token_id=0)
    tokenizer.save_pretrained(str(directory))
    return model
