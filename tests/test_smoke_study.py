"""The smoke study (configs/studies/smoke.yaml, slow): every method of the catalog x every domain x both start points
runs to done on the tiny random model; the matrix it lists is the full product, so no method or domain is left out."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from forgetjax.methods.catalog import METHODS

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "studies" / "smoke.yaml"


def test_smoke_config_covers_every_method_domain_and_start_point():
    study = yaml.safe_load(CONFIG.read_text())
    assert set(study["methods"]) == set(METHODS)
    assert set(study["domains"]) == {"math", "code", "qa"}
    assert set(study["start_points"]) == {"base", "safe"}


@pytest.mark.slow
def test_smoke_study_runs_every_cell(tmp_path, data_dir):
    """Every cell of the product is run and ends done with its 2 steps (SF-/CF-SFT keep unverified teacher samples and
    DPO pairs the reference completion against the model's samples: the random model solves nothing)."""
    results = tmp_path / "results"
    cmd = [sys.executable, "-m", "forgetjax", "study", str(CONFIG), "--no-report", f"results_dir={results}",
           f"data_dir={data_dir}"]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    cells = [json.loads(p.read_text()) for p in (results / "cells").glob("*/cell.json")]
    trained = {(c["start_point"], c["method"], c["domain"]) for c in cells if c["method"] != "baseline"}
    assert trained == {(start, method, domain) for start in ("base", "safe") for method in METHODS
                       for domain in ("math", "code", "qa")}
    assert out.returncode == 0, out.stderr[-3000:]
    for cell in cells:
        assert cell["status"] == "done", (cell["cell_id"], cell.get("error"), out.stdout[-2000:])
        if cell["method"] != "baseline":
            assert cell["budget"]["used"]["steps"] == 2, cell["cell_id"]

def test_tiny_random_model_shares_the_embedded_tokenizer():
    """smollm2-tiny-random: the seeded tiny model the smoke study starts from, with SmolLM2's tokenizer and template."""
    import forgetjax
    from forgetjax.assets import embedded_checkpoint
    from transformers import AutoTokenizer

    model, tokenizer = forgetjax.load("embedded:smollm2-tiny-random")
    reference = AutoTokenizer.from_pretrained(str(embedded_checkpoint("smollm2-135m-instruct") / "tokenizer"))
    messages = [{"role": "user", "content": "What is 2 + 3? Answer in \\boxed{}."}]
    assert (tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            == reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    assert tokenizer("def f(x): return x")["input_ids"] == reference("def f(x): return x")["input_ids"]
    assert model.config.num_layers == 2 and model.config.vocab_size >= len(reference)
