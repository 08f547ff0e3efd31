"""The `forgetjax` command line: help texts, convert -> export -> transformers, generate, input errors."""
import json
import subprocess
import sys

import numpy as np

from tiny_models import hf_logits, left_padded_batch, make_hf_model


def run_cli(*args, check=True):
    result = subprocess.run([sys.executable, "-m", "forgetjax.cli", *map(str, args)], capture_output=True,
                            text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"forgetjax {' '.join(map(str, args))} failed:\n{result.stdout}\n{result.stderr}")
    return result


def test_help_explains_every_argument():
    top = run_cli("--help").stdout
    for command in ("convert", "export", "chat", "generate", "quickstart"):
        assert command in top
    convert = run_cli("convert", "--help").stdout
    assert "hub id" in convert and ".gguf" in convert and "output directory" in convert
    export = run_cli("export", "--help").stdout
    assert "forgetjax checkpoint" in export and "--max-shard-gb" in export


def test_convert_then_export_loads_in_transformers(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    hf = make_hf_model(tmp_path / "src", "qwen2")
    run_cli("convert", tmp_path / "src", tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "forgetjax.json").is_file()
    run_cli("export", tmp_path / "ckpt", tmp_path / "hf")
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    ids, mask = left_padded_batch(np.random.default_rng(0), [6, 4], vocab=151)
    assert np.array_equal(hf_logits(reloaded, ids, mask), hf_logits(hf, ids, mask))


def test_generate_writes_jsonl_and_reports_bad_lines(tmp_path):
    make_hf_model(tmp_path / "src", "llama")  # AutoTokenizer would swap a toy tokenizer for Qwen2's under qwen2
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(151)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", eos_token="t2").save_pretrained(
        str(tmp_path / "src"))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "t5 t6 t7", "id": 1}) + "\n" + json.dumps({"prompt": "t9"}) + "\n")
    run_cli("generate", tmp_path / "src", "--prompts", prompts, "--out", tmp_path / "out.jsonl", "--no-chat",
            "--max-new-tokens", "4", "--n", "2", "--temperature", "1.0")
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and rows[0]["id"] == 1 and {r["sample"] for r in rows} == {0, 1}
    assert all(1 <= r["output_tokens"] <= 4 for r in rows)
    prompts.write_text(json.dumps({"prompt": "t5"}) + "\n{not json\n")
    bad = run_cli("generate", tmp_path / "src", "--prompts", prompts, "--out", tmp_path / "x.jsonl", check=False)
    assert bad.returncode != 0 and "prompts.jsonl:2" in bad.stderr
