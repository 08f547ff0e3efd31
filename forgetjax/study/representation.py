"""Representation analysis of a post-trained model against its start: CKA per layer, refusal-direction
attenuation, the singular-value spectrum of weight deltas per module, and linear knowledge probes per layer.

Probe prompts are fixed: harmful instructions from HarmBench's validation split (the battery evaluates its test
split) and harmless questions from NQ-open, both chat-templated. Activations are the residual stream after every
layer, mean-pooled over prompt tokens (CKA) or taken at the last prompt token (refusal direction).
Knowledge probes (`analysis.probes`): statements "Question: <q>? Answer: <a>." from NQ-open dev items
(STATEMENT_OFFSET on, apart from the harmless probes), true with the item's first answer and false with the next
item's, as plain text (no chat template), residual stream at the last token; items are split 70/30 by a sha256 of
their index (an item's true and false statements stay together), a probe per layer is fit on the start model's
training split and scored on the held-out split under the start and the post-trained model.
"""
from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from forgetjax.analysis.probes import layer_probe_accuracies
from forgetjax.analysis.representation import (difference_of_means, direction_attenuation, linear_cka,
                                               spectrum_summary)
from forgetjax.io import read_jsonl
from forgetjax.tasks.prompts import user_message

MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


def probe_prompts(data_dir: str | Path, n: int) -> tuple[list[str], list[str]]:
    data_dir = Path(data_dir)
    with open(data_dir / "harmbench" / "harmbench_behaviors_text_val.csv", newline="") as f:
        harmful = [row["Behavior"] for row in csv.DictReader(f) if not row.get("ContextString")][:n]
    rows = read_jsonl(data_dir / "nq_open" / "NQ-open.dev.jsonl")[:n]
    harmless = [row["question"].strip().capitalize() + "?" for row in rows]
    return harmful, harmless


STATEMENT_OFFSET = 2000
PROBE_TRAIN_SHARE = 0.7


def knowledge_statements(data_dir: str | Path, n_items: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(statements, labels 1 = true, train flags): a true and a false statement per NQ-open item."""
    rows = read_jsonl(Path(data_dir) / "nq_open" / "NQ-open.dev.jsonl")[STATEMENT_OFFSET:STATEMENT_OFFSET + n_items]
    if len(rows) < 2:
        raise ValueError(f"knowledge probes need at least 2 NQ-open items from row {STATEMENT_OFFSET}")
    texts, labels, train = [], [], []
    for index, row in enumerate(rows):
        question = row["question"].strip().capitalize()
        other = rows[(index + 1) % len(rows)]["answer"][0]
        in_train = int(hashlib.sha256(f"probe-split-{index}".encode()).hexdigest(), 16) % 100 < 100 * PROBE_TRAIN_SHARE
        for answer, label in ((row["answer"][0], 1), (other, 0)):
            texts.append(f"Question: {question}? Answer: {answer}.")
            labels.append(label)
            train.append(in_train)
    return texts, np.array(labels), np.array(train)


def _statement_activations(model, tokenizer, texts: list[str]) -> np.ndarray:
    """Last-token residual activations [L, n, d] of plain texts (no chat template)."""
    from forgetjax.sampling.sampler import Sampler

    sampler = Sampler(model, tokenizer)
    ids, mask = sampler.left_pad([tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts])
    forward = jax.jit(lambda m, i, k: m.forward_hidden(i, k, return_hidden=True)[2])
    return np.asarray(forward(model, ids, mask), np.float64)[:, :, -1, :]


def knowledge_probe(start_model, post_model, tokenizer, data_dir: str | Path, n_items: int) -> dict:
    """Per-layer probe accuracy on held-out statements: probes fit on the start model scored with the start and the
    post-trained activations (does the start's read-out still work?), and probes refit on the post-trained model's
    training statements (post_refit: is the knowledge still linearly decodable, only moved?)."""
    texts, labels, train = knowledge_statements(data_dir, n_items)
    if train.all() or not train.any():
        raise ValueError(f"knowledge probes: {n_items} items leave an empty training or held-out split")
    start = _statement_activations(start_model, tokenizer, texts)
    post = _statement_activations(post_model, tokenizer, texts)
    accuracy = layer_probe_accuracies(start[:, train], labels[train], {"start": start[:, ~train],
                                                                        "post": post[:, ~train]}, labels[~train])
    refit = layer_probe_accuracies(post[:, train], labels[train], {"post_refit": post[:, ~train]}, labels[~train])
    return {**accuracy, **refit, "n_train": int(train.sum()), "n_test": int((~train).sum())}


def _activations(model, tokenizer, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(mean-pooled [L, n, d], last-token [L, n, d]) residual activations after each layer."""
    from forgetjax.sampling.sampler import Sampler

    sampler = Sampler(model, tokenizer)
    ids, mask = sampler.left_pad([sampler.encode_chat(user_message(p)) for p in prompts])
    forward = jax.jit(lambda m, i, k: m.forward_hidden(i, k, return_hidden=True)[2])
    layers = np.asarray(forward(model, ids, mask), np.float64)
    weights = mask[None, :, :, None].astype(np.float64)
    pooled = (layers * weights).sum(2) / weights.sum(2)
    return pooled, layers[:, :, -1, :]


def _kernels(model) -> dict[str, np.ndarray]:
    from forgetjax.training.lora import merge_lora

    state = nnx.state(merge_lora(model), nnx.Param)
    out = {}
    for path, var in state.flat_state():
        key = ".".join(map(str, path))
        for module in MODULES:
            if key == f"layers.{module}.kernel":
                out[module] = np.asarray(jax.device_get(var[...]), np.float32)
    return out


def analyse(start_model, post_model, tokenizer, data_dir: str | Path, n_probe: int = 32) -> dict:
    """representation.json content (see forgetjax.results.representation_json)."""
    from forgetjax.results import representation_json

    harmful, harmless = probe_prompts(data_dir, n_probe)
    probe = harmful + harmless
    start_pooled, start_last = _activations(start_model, tokenizer, probe)
    post_pooled, post_last = _activations(post_model, tokenizer, probe)
    n = len(harmful)
    layers = list(range(start_pooled.shape[0]))
    cka = [linear_cka(start_pooled[i], post_pooled[i]) for i in layers]
    refusal = []
    for i in layers:
        dir_start = difference_of_means(start_last[i, :n], start_last[i, n:])
        dir_post = difference_of_means(post_last[i, :n], post_last[i, n:])
        refusal.append(direction_attenuation(dir_start, dir_post, post_last[i, :n], post_last[i, n:]))
    start_k, post_k = _kernels(start_model), _kernels(post_model)
    deltas = {module: [spectrum_summary(post_k[module][i] - start_k[module][i]) for i in layers]
              for module in MODULES}
    probe = knowledge_probe(start_model, post_model, tokenizer, data_dir, max(4 * n_probe, 16))
    return representation_json(layers, cka=cka, refusal_direction=refusal, weight_delta=deltas,
                               knowledge_probe=probe)
