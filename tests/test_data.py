"""Data pipeline: record readers and their errors, chat/text tokenisation masks against hand-written SmolLM2
templates and `apply_chat_template`, the batch contract (hand-built arrays), first-fit packing, buckets, seeded
shuffles, exact resume, multi-host shards and preference pairs. Real GSM8K train records where data helps."""
from __future__ import annotations

import gzip
import json
from collections import Counter

import numpy as np
import pytest

from forgetjax.data import (
    CONTRACT_FIELDS, ChatExample, ExampleEncoder, RecordError, TemplateError, TokenizedExample, collate_rows,
    first_fit_rows, length_buckets, make_pair_batches, make_sft_pipeline, read_records,
)
from forgetjax.data.batching import bucket_for, check_buckets

GSM8K_FIELDS = {"question": "prompt", "answer": "completion"}
SMOL_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


# ----------------------------------------------------------------------------------------------- fixtures / helpers

@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from forgetjax.assets import embedded_checkpoint

    return AutoTokenizer.from_pretrained(embedded_checkpoint() / "tokenizer")


@pytest.fixture(scope="module")
def gsm8k_lines(data_dir) -> list[dict]:
    with open(data_dir / "gsm8k" / "train.jsonl") as f:
        return [json.loads(next(f)) for _ in range(300)]


@pytest.fixture(scope="module")
def gsm8k(data_dir):
    return read_records(data_dir / "gsm8k" / "train.jsonl", fields=GSM8K_FIELDS, limit=300)


def smol_prompt(question: str, system: str | None = None) -> str:
    """The SmolLM2 chat template written out by hand (system default, user turn, generation prompt)."""
    return (f"<|im_start|>system\n{system or SMOL_SYSTEM}<|im_end|>\n"
            f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n")


def decode(tokenizer, ids) -> str:
    return tokenizer.decode([int(i) for i in ids], skip_special_tokens=False, clean_up_tokenization_spaces=False)


def reference_encoding(tokenizer, record: dict) -> tuple[tuple[int, ...], int]:
    """(ids, prompt length) from transformers' apply_chat_template; the template's trailing newline is dropped."""
    prompt = [{"role": "user", "content": record["prompt"]}]
    full = prompt + [{"role": "assistant", "content": record["completion"]}]
    prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True)["input_ids"]
    full_ids = tokenizer.apply_chat_template(full)["input_ids"]
    assert decode(tokenizer, full_ids[-1:]) == "\n"
    return tuple(full_ids[:-1]), len(prompt_ids)


def segments(batch: dict, row: int) -> list[slice]:
    seg = batch["segment_ids"][row]
    return [slice(int(np.argmax(seg == s)), int(np.argmax(seg == s)) + int((seg == s).sum()))
            for s in range(1, int(seg.max()) + 1)]


def check_contract(batch: dict, rows: int, length: int, pad_id: int) -> None:
    """Shapes, dtypes and the padding invariants of the batch contract."""
    dtypes = {"input_ids": np.int32, "targets": np.int32, "loss_mask": np.float32, "attention_mask": np.bool_,
              "positions": np.int32, "segment_ids": np.int32}
    assert set(batch) == set(CONTRACT_FIELDS)
    for key, dtype in dtypes.items():
        assert batch[key].shape == (rows, length) and batch[key].dtype == dtype, key
    pad = ~batch["attention_mask"]
    np.testing.assert_array_equal(batch["attention_mask"], batch["segment_ids"] > 0)
    assert (batch["positions"][pad] == 0).all() and (batch["loss_mask"][pad] == 0).all()
    assert (batch["input_ids"][pad] == pad_id).all() and (batch["targets"][pad] == pad_id).all()


def all_batches(iterator) -> list[dict]:
    return [dict(b) for b in iterator]


def assert_same_batches(left: list[dict], right: list[dict]) -> None:
    assert len(left) == len(right)
    for a, b in zip(left, right):
        assert set(a) == set(b)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def example_order(batches: list[dict], lookup: dict[tuple[int, ...], int]) -> list[int]:
    """Record indices in the order their segments appear in the batches."""
    order = []
    for batch in batches:
        for row in range(batch["input_ids"].shape[0]):
            for s in segments(batch, row):
                order.append(lookup[tuple(batch["input_ids"][row, s].tolist())])
    return order


# ------------------------------------------------------------------------------------------------------- records

def test_gsm8k_records_are_read_and_renamed(gsm8k, gsm8k_lines):
    assert len(gsm8k) == 300 and gsm8k.skipped == 0
    for record, line in zip(gsm8k, gsm8k_lines):
        assert record == {"prompt": line["question"], "completion": line["answer"]}
    assert gsm8k.locations[0].endswith("train.jsonl:1")


def test_malformed_jsonl_errors_name_file_line_and_source_field(tmp_path):
    path = tmp_path / "train.jsonl"
    lines = [{"question": "q1", "answer": "a1"}, {"question": "q2", "answer": "a2"}, {"question": "q3"},
             {"question": 4, "answer": "a4"}, "not json", {"question": "q6", "answer": "  "}, [1, 2],
             {"question": "q8", "answer": "a8"}]
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n\n")
    with pytest.raises(RecordError) as err:
        read_records(path, fields=GSM8K_FIELDS)
    assert str(err.value) == f"{path}:3: field 'answer' missing"
    result = read_records(path, fields=GSM8K_FIELDS, skip_malformed=True)
    assert [r["prompt"] for r in result] == ["q1", "q2", "q8"]
    assert result.locations == [f"{path}:1", f"{path}:2", f"{path}:8"]
    assert result.skipped == 5
    assert result.problems[0] == f"{path}:3: field 'answer' missing"
    assert result.problems[1] == f"{path}:4: field 'question' must be a string, got int"
    assert result.problems[2].startswith(f"{path}:5: invalid JSON")
    assert result.problems[3] == f"{path}:6: field 'answer' is empty"
    assert result.problems[4] == f"{path}:7: expected a record (mapping), got list"


def test_csv_json_parquet_and_gzip_sources(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": "p1", "completion": "c1"}, {"prompt": "p2", "completion": "c2"}]
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("prompt,completion\np1,c1\np2,c2\np3,\n")
    with pytest.raises(RecordError) as err:
        read_records(csv_path)
    assert str(err.value) == f"{csv_path}:row 3: field 'completion' is empty"
    assert read_records(csv_path, skip_malformed=True).records == rows

    json_path = tmp_path / "d.json"
    json_path.write_text(json.dumps(rows + [{"prompt": "p3"}]))
    with pytest.raises(RecordError, match=r"d\.json:item 3: field 'completion' missing"):
        read_records(json_path)

    parquet_path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows + [{"prompt": "p3", "completion": None}]), parquet_path)
    with pytest.raises(RecordError, match=r"d\.parquet:row 3: field 'completion' missing"):
        read_records(parquet_path)

    gz_path = tmp_path / "d.jsonl.gz"
    with gzip.open(gz_path, "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    both = read_records([gz_path, csv_path], skip_malformed=True)
    assert both.records == rows + rows and both.skipped == 1


def test_pair_and_messages_schemas(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("prompt,chosen,rejected,ref_chosen_logp\np,good,bad,-1.5\np,good,bad,oops\n")
    with pytest.raises(RecordError) as err:
        read_records(path, schema="pair", numeric_fields=["ref_chosen_logp"])
    assert str(err.value) == f"{path}:row 2: field 'ref_chosen_logp' must be a finite number, got 'oops'"
    result = read_records(path, schema="pair", numeric_fields=["ref_chosen_logp"], skip_malformed=True)
    assert result.records == [{"prompt": "p", "chosen": "good", "rejected": "bad", "ref_chosen_logp": -1.5}]
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant",
                                                                                   "content": "yo"}]}) + "\n"
                    + json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(RecordError, match=r"chat\.jsonl:2: field 'messages' must be a list of at least two"):
        read_records(chat)


def test_bad_sources_give_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(RecordError, match="unsupported record file type"):
        read_records(tmp_path / "x.txt")
    with pytest.raises(RecordError, match="record file not found"):
        read_records(tmp_path / "missing.jsonl")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RecordError, match=r"hf://openai/gsm8k/main:train: cannot download .* offline"):
        read_records("hf://openai/gsm8k/main:train")
    with pytest.raises(RecordError, match="expected hf://org/name:split"):
        read_records("hf://gsm8k")


# -------------------------------------------------------------------------------------------------- tokenisation

@pytest.mark.real_model
def test_chat_mask_is_the_assistant_answer_and_end_of_turn(tokenizer, gsm8k):
    encoder = ExampleEncoder(tokenizer, max_length=2048)
    for record in gsm8k.records[:8]:
        example = encoder.encode(record)
        ids, mask = example.input_ids, example.completion_mask
        assert decode(tokenizer, ids[~mask]) == smol_prompt(record["prompt"])
        assert decode(tokenizer, ids[mask]) == record["completion"] + "<|im_end|>"
        assert mask[-1] and not mask[0] and (np.diff(mask.astype(int)) >= 0).all()
        ref_ids, ref_prompt = reference_encoding(tokenizer, record)
        assert tuple(ids.tolist()) == ref_ids and int((~mask).sum()) == ref_prompt
    system = encoder.encode(ChatExample("What is 7*6?", "42", system="Be terse."))
    assert decode(tokenizer, system.input_ids[~system.completion_mask]) == smol_prompt("What is 7*6?", "Be terse.")


@pytest.mark.real_model
def test_multi_turn_messages_learn_only_the_last_assistant_turn(tokenizer):
    messages = [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    example = ExampleEncoder(tokenizer, max_length=512).encode({"messages": messages})
    ids, mask = example.input_ids, example.completion_mask
    assert decode(tokenizer, ids[mask]) == "4<|im_end|>"
    assert decode(tokenizer, ids[~mask]) == (f"<|im_start|>system\n{SMOL_SYSTEM}<|im_end|>\n<|im_start|>user\nHi!"
                                             "<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n"
                                             "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.real_model
def test_text_format_is_prompt_completion_eos(tokenizer):
    example = ExampleEncoder(tokenizer, max_length=64, chat=False).encode(
        ChatExample("Question: 2+2?\nAnswer:", " 4 apples"))
    assert decode(tokenizer, example.input_ids) == "Question: 2+2?\nAnswer: 4 apples<|im_end|>"
    assert decode(tokenizer, example.input_ids[example.completion_mask]) == " 4 apples<|im_end|>"
    assert example.input_ids[-1] == tokenizer.eos_token_id


@pytest.mark.real_model
def test_template_breaking_the_prefix_property_is_an_error(tokenizer):
    from transformers import AutoTokenizer

    from forgetjax.assets import embedded_checkpoint

    bad = AutoTokenizer.from_pretrained(embedded_checkpoint() / "tokenizer")
    bad.chat_template = (
        "{% for m in messages %}{% if loop.last and add_generation_prompt %}<|im_start|>{{ m['role'] }}\nQ: "
        "{{ m['content'] }}<|im_end|>\n{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(TemplateError, match="not render the prompt .* as a prefix"):
        ExampleEncoder(bad, max_length=512).encode(ChatExample("2+2?", "4"))
    with pytest.raises(ValueError, match="not in the tokenizer's vocabulary"):
        ExampleEncoder(tokenizer, max_length=512, end_of_turn="<|nope|>")


@pytest.mark.real_model
def test_truncation_policies_are_applied_and_counted(tokenizer):
    record = {"prompt": "word " * 100, "completion": "The answer is 12."}
    ref_ids, ref_prompt = reference_encoding(tokenizer, record)
    completion_len = len(ref_ids) - ref_prompt
    max_length = completion_len + 20
    left = ExampleEncoder(tokenizer, max_length=max_length, truncation="left")
    example = left.encode(record)
    assert tuple(example.input_ids.tolist()) == ref_ids[len(ref_ids) - max_length:]
    assert int(example.completion_mask.sum()) == completion_len and left.stats.truncated == 1
    assert left.encode({"prompt": "hi", "completion": "long " * max_length}) is None
    assert left.stats.dropped == 1 and left.stats.examples == 1
    drop = ExampleEncoder(tokenizer, max_length=max_length, truncation="drop")
    assert drop.encode(record) is None and drop.stats.dropped == 1 and drop.stats.truncated == 0
    with pytest.raises(ValueError, match=rf"data\.jsonl:9: {len(ref_ids)} tokens > max_length {max_length}"):
        ExampleEncoder(tokenizer, max_length=max_length, truncation="error").encode(record, "data.jsonl:9")


# ---------------------------------------------------------------------------------------------- batching (pure)

def tokenized(ids: list[int], mask: list[int]) -> TokenizedExample:
    return TokenizedExample(np.asarray(ids, np.int32), np.asarray(mask, bool))


def test_collate_rows_matches_hand_built_arrays():
    a = tokenized([11, 12, 13], [0, 1, 1])
    b = tokenized([21, 22], [0, 1])
    c = tokenized([31, 32, 33, 34], [0, 0, 1, 1])
    batch = collate_rows([[a, b], [c], []], length=6, pad_id=0)
    expected = {
        "input_ids": [[11, 12, 13, 21, 22, 0], [31, 32, 33, 34, 0, 0], [0] * 6],
        "targets": [[12, 13, 0, 22, 0, 0], [32, 33, 34, 0, 0, 0], [0] * 6],
        "loss_mask": [[1, 1, 0, 1, 0, 0], [0, 1, 1, 0, 0, 0], [0] * 6],
        "attention_mask": [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0], [0] * 6],
        "positions": [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 0], [0] * 6],
        "segment_ids": [[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 0, 0], [0] * 6],
    }
    check_contract(batch, rows=3, length=6, pad_id=0)
    for key, value in expected.items():
        np.testing.assert_array_equal(batch[key], np.asarray(value), err_msg=key)
    with pytest.raises(ValueError, match="row 0 holds 7 tokens > batch length 6"):
        collate_rows([[a, c]], length=6, pad_id=0)


def test_first_fit_packing_by_hand():
    assert first_fit_rows([4, 3, 2, 5, 1], [0, 1, 2, 3, 4], capacity=6) == [[0, 2], [1, 4], [3]]
    assert first_fit_rows([4, 3, 2, 5, 1], [3, 4, 0, 1, 2], capacity=6) == [[3, 4], [0, 2], [1]]
    with pytest.raises(ValueError, match="example 0 has 7 tokens > row capacity 6"):
        first_fit_rows([7], [0], capacity=6)


def test_length_buckets():
    assert length_buckets(300) == (64, 128, 256, 300)
    assert length_buckets(512) == (64, 128, 256, 512)
    assert length_buckets(40) == (40,)
    assert bucket_for(65, (64, 128)) == 128 and bucket_for(64, (64, 128)) == 64
    with pytest.raises(ValueError, match="largest bucket must equal max_length=512"):
        check_buckets([64, 256], 512)


def test_shuffled_order_matches_a_pure_python_splitmix64():
    from forgetjax.data.pipeline import derived_seed, shuffled_order

    mask = (1 << 64) - 1

    def mix(z: int) -> int:
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    for seed in (0, 12345, mask):
        keys = [mix((seed + 0x9E3779B97F4A7C15 * (i + 1)) & mask) for i in range(50)]
        assert shuffled_order(50, seed) == sorted(range(50), key=lambda i: keys[i])
    assert derived_seed(1, 0, 0) != derived_seed(0, 1, 0) != derived_seed(0, 0, 1)


# ------------------------------------------------------------------------------------------------------ pipeline

@pytest.fixture(scope="module")
def short_records(tokenizer, gsm8k):
    """GSM8K records whose reference encoding fits 512 tokens, with their reference ids and prompt lengths."""
    kept = []
    for record in gsm8k.records[:200]:
        ids, prompt_len = reference_encoding(tokenizer, record)
        if len(ids) <= 512:
            kept.append((record, ids, prompt_len))
    return kept


@pytest.mark.real_model
@pytest.mark.parametrize("packing", [True, False])
def test_every_example_once_per_epoch_with_exact_segments(tokenizer, short_records, packing):
    records = [r for r, _, _ in short_records]
    lookup = {ids: i for i, (_, ids, _) in enumerate(short_records)}
    it = make_sft_pipeline(records, tokenizer, batch_size=4, max_length=512, seed=0, packing=packing, epochs=2)
    batches = all_batches(it)
    assert len(batches) == it.num_batches and it.stats.examples == len(records) and it.stats.truncated == 0
    pad = tokenizer.pad_token_id
    counts_per_epoch = Counter()
    seen = 0
    for step, batch in enumerate(batches):
        check_contract(batch, rows=4, length=batch["input_ids"].shape[1], pad_id=pad)
        if packing:
            assert batch["input_ids"].shape[1] == 512
        for row in range(4):
            spans = segments(batch, row)
            assert spans == sorted(spans, key=lambda s: s.start) and (not spans or spans[0].start == 0)
            for s, next_s in zip(spans, spans[1:]):
                assert s.stop == next_s.start
            for s in spans:
                ids = tuple(batch["input_ids"][row, s].tolist())
                assert ids in lookup, "a segment is not a whole example"
                _, ref_ids, prompt_len = short_records[lookup[ids]]
                n = len(ref_ids)
                np.testing.assert_array_equal(batch["positions"][row, s], np.arange(n))
                np.testing.assert_array_equal(batch["targets"][row, s], list(ref_ids[1:]) + [pad])
                expected_mask = [1.0 if t + 1 >= prompt_len else 0.0 for t in range(n - 1)] + [0.0]
                np.testing.assert_array_equal(batch["loss_mask"][row, s], expected_mask)
                epoch = 0 if seen < len(records) else 1
                counts_per_epoch[(epoch, lookup[ids])] += 1
                seen += 1
    assert seen == 2 * len(records)
    assert all(counts_per_epoch[(e, i)] == 1 for e in (0, 1) for i in range(len(records)))


@pytest.mark.real_model
def test_padding_uses_the_smallest_bucket_that_fits(tokenizer, short_records):
    records = [r for r, _, _ in short_records[:40]]
    buckets = (160, 224, 320, 512)
    it = make_sft_pipeline(records, tokenizer, batch_size=4, max_length=512, seed=1, buckets=buckets)
    used = set()
    for batch in it:
        lengths = batch["attention_mask"].sum(axis=1)
        expected = min(b for b in buckets if b >= lengths.max())
        assert batch["input_ids"].shape == (4, expected)
        used.add(expected)
        for row, n in enumerate(lengths):
            assert batch["attention_mask"][row, :n].all() and (batch["segment_ids"][row, :n] == 1).all()
    assert len(used) >= 2


@pytest.mark.real_model
def test_shuffle_is_seeded_per_epoch(tokenizer, short_records):
    records = [r for r, _, _ in short_records[:24]]
    lookup = {ids: i for i, (_, ids, _) in enumerate(short_records[:24])}

    def orders(seed):
        batches = all_batches(make_sft_pipeline(records, tokenizer, batch_size=4, max_length=512, seed=seed,
                                                epochs=2, prefetch=0, num_threads=0))
        order = example_order(batches, lookup)
        return order[:24], order[24:]

    s0e0, s0e1 = orders(0)
    again = orders(0)
    s1e0, s1e1 = orders(1)
    assert (s0e0, s0e1) == again
    for order in (s0e0, s0e1, s1e0, s1e1):
        assert sorted(order) == list(range(24))
    assert len({tuple(o) for o in (s0e0, s0e1, s1e0, s1e1)}) == 4
    assert s0e0 != list(range(24))


@pytest.mark.real_model
@pytest.mark.parametrize("packing", [False, True])
def test_resume_from_saved_state_gives_the_same_remaining_batches(tokenizer, short_records, packing):
    records = [r for r, _, _ in short_records[:30]]
    kwargs = dict(batch_size=4, max_length=512, seed=5, packing=packing, epochs=2)
    full = all_batches(make_sft_pipeline(records, tokenizer, **kwargs))
    total = len(full)
    per_epoch = make_sft_pipeline(records, tokenizer, **kwargs).stats.batches_per_epoch
    for k in sorted({0, 1, per_epoch - 1, per_epoch, per_epoch + 1, total - 1, total}):
        first = make_sft_pipeline(records, tokenizer, **kwargs)
        consumed = [next(first) for _ in range(k)]
        assert_same_batches(consumed, full[:k])
        state = json.loads(json.dumps(first.get_state()))
        assert state["next_index"] == k
        resumed = make_sft_pipeline(records, tokenizer, **kwargs)
        next(resumed)
        resumed.set_state(state)
        assert_same_batches(all_batches(resumed), full[k:])
    other = make_sft_pipeline(records, tokenizer, **{**kwargs, "seed": 6})
    with pytest.raises(ValueError, match="different pipeline"):
        other.set_state(state)


@pytest.mark.real_model
def test_repeat_forever_and_resume_in_a_later_epoch(tokenizer, short_records):
    records = [r for r, _, _ in short_records[:10]]
    lookup = {ids: i for i, (_, ids, _) in enumerate(short_records[:10])}
    it = make_sft_pipeline(records, tokenizer, batch_size=4, max_length=512, seed=2, packing=True, epochs=None)
    assert it.num_batches is None
    batches = [next(it) for _ in range(12)]
    epochs = [it.schedule.locate(i)[0] for i in range(12)]
    first_epoch = [b for b, e in zip(batches, epochs) if e == 0]
    assert sorted(example_order(first_epoch, lookup)) == list(range(10))
    resumed = make_sft_pipeline(records, tokenizer, batch_size=4, max_length=512, seed=2, packing=True,
                                epochs=None)
    resumed.set_state({"next_index": 7, "fingerprint": it.fingerprint})
    assert_same_batches([next(resumed) for _ in range(5)], batches[7:])


@pytest.mark.real_model
@pytest.mark.parametrize("packing", [False, True])
def test_shards_partition_every_global_batch(tokenizer, short_records, packing):
    records = [r for r, _, _ in short_records[:30]]
    kwargs = dict(batch_size=4, max_length=512, seed=3, packing=packing)
    full = all_batches(make_sft_pipeline(records, tokenizer, **kwargs))
    shards = [all_batches(make_sft_pipeline(records, tokenizer, shard_index=i, shard_count=2, **kwargs))
              for i in range(2)]
    assert len(shards[0]) == len(shards[1]) == len(full)
    for whole, left, right in zip(full, *shards):
        for key in CONTRACT_FIELDS:
            np.testing.assert_array_equal(np.concatenate([left[key], right[key]]), whole[key])
    with pytest.raises(ValueError, match="not divisible by shard_count 3"):
        make_sft_pipeline(records, tokenizer, shard_count=3, **kwargs)


@pytest.mark.real_model
def test_last_batch_is_filled_or_dropped(tokenizer, short_records):
    records = [r for r, _, _ in short_records[:10]]
    filled = all_batches(make_sft_pipeline(records, tokenizer, batch_size=4, max_length=512, seed=0))
    assert len(filled) == 3
    assert filled[-1]["attention_mask"][:2].any(axis=1).all() and not filled[-1]["attention_mask"][2:].any()
    dropped = make_sft_pipeline(records, tokenizer, batch_size=4, max_length=512, seed=0, drop_remainder=True)
    assert dropped.num_batches == 2 and len(all_batches(dropped)) == 2


@pytest.mark.real_model
def test_pipeline_from_path_reports_skipped_and_truncated(tokenizer, tmp_path, gsm8k_lines):
    path = tmp_path / "train.jsonl"
    lines = [json.dumps(x) for x in gsm8k_lines[:12]]
    lines[3] = json.dumps({"question": "no answer"})
    lines[7] = json.dumps({"question": "x " * 600, "answer": "4"})
    lines[9] = json.dumps({"question": "short", "answer": "y " * 600})
    path.write_text("\n".join(lines) + "\n")
    it = make_sft_pipeline(path, tokenizer, batch_size=4, max_length=512, seed=0, fields=GSM8K_FIELDS,
                           skip_malformed=True)
    assert (it.stats.records, it.stats.skipped_malformed, it.stats.examples) == (12, 1, 10)
    assert (it.stats.truncated, it.stats.dropped) == (1, 1)
    with pytest.raises(RecordError, match=r"train\.jsonl:4: field 'answer' missing"):
        make_sft_pipeline(path, tokenizer, batch_size=4, max_length=512, seed=0, fields=GSM8K_FIELDS)


@pytest.mark.real_model
def test_pair_batches(tokenizer, gsm8k):
    pairs = [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": f"I think it is {i}.",
              "ref_chosen_logp": -10.0 - i, "ref_rejected_logp": -20.0 - i}
             for i, r in enumerate(gsm8k.records[:6])]
    by_prompt = {p["prompt"]: p for p in pairs}
    it = make_pair_batches(pairs, tokenizer, batch_size=4, max_length=512, seed=0,
                           float_fields=["ref_chosen_logp", "ref_rejected_logp"])
    batches = all_batches(it)
    assert len(batches) == 2
    expected_keys = {f"{side}_{k}" for side in ("chosen", "rejected") for k in CONTRACT_FIELDS}
    seen = []
    for batch in batches:
        assert set(batch) == expected_keys | {"ref_chosen_logp", "ref_rejected_logp", "pair_mask"}
        length = batch["chosen_input_ids"].shape[1]
        assert batch["rejected_input_ids"].shape == (4, length) and batch["pair_mask"].shape == (4,)
        longest = max(batch["chosen_attention_mask"].sum(1).max(), batch["rejected_attention_mask"].sum(1).max())
        assert length == min(b for b in length_buckets(512) if b >= longest)
        for row in range(4):
            if batch["pair_mask"][row] == 0:
                assert not batch["chosen_attention_mask"][row].any() and batch["ref_chosen_logp"][row] == 0
                continue
            ids = batch["chosen_input_ids"][row]
            prompt_text = decode(tokenizer, ids[batch["chosen_attention_mask"][row]])
            question = prompt_text.split("<|im_start|>user\n")[1].split("<|im_end|>")[0]
            pair = by_prompt[question]
            seen.append(question)
            for side in ("chosen", "rejected"):
                learned = batch[f"{side}_targets"][row][batch[f"{side}_loss_mask"][row] > 0]
                assert decode(tokenizer, learned) == pair[side] + "<|im_end|>"
            assert batch["ref_chosen_logp"][row] == np.float32(pair["ref_chosen_logp"])
            assert batch["ref_rejected_logp"][row] == np.float32(pair["ref_rejected_logp"])
    assert sorted(seen) == sorted(by_prompt)
    np.testing.assert_array_equal(batches[1]["pair_mask"], [1, 1, 0, 0])
