"""Forward on an 8-device (data=2, fsdp=2, tensor=2) mesh equals the single-device result, with real sharding; no
device ever holds a full copy of a sharded parameter while a model is created or loaded on a mesh."""
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import forgetjax
from forgetjax.models.decoder import CausalLM
from forgetjax.sharding import create_sharded, logical_to_spec, make_mesh, shard_batch
from tiny_models import hf_logits, left_padded_batch, make_hf_model, max_relative_error

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def eight_devices():
    """conftest.py appends the device-count flag to XLA_FLAGS before JAX starts, so these tests never skip."""
    assert jax.device_count() == 8, f"expected 8 simulated devices, got {jax.device_count()}"


def test_sharded_forward_matches_single_device(tmp_path):
    hf = make_hf_model(tmp_path, "qwen2", hidden_size=64, intermediate_size=128, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=160)
    single, _ = forgetjax.load(tmp_path)
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    sharded, _ = forgetjax.load(tmp_path, mesh=mesh)

    q = sharded.layers.self_attn.q_proj.kernel[...]
    assert q.sharding.spec == P(None, "fsdp", "tensor")
    assert q.addressable_shards[0].data.shape == (2, 32, 32)
    emb = sharded.embed_tokens.embedding[...]
    assert emb.sharding.spec == P("tensor", "fsdp")
    assert emb.addressable_shards[0].data.shape == (80, 32)
    down = sharded.layers.mlp.down_proj.kernel[...]
    assert down.sharding.spec == P(None, "tensor", "fsdp")
    assert len({d for s in down.addressable_shards for d in [s.device]}) == 8

    ids, mask = left_padded_batch(np.random.default_rng(0), [9, 3, 6, 1], vocab=160)
    expected = np.asarray(single(ids, mask))
    batch = shard_batch({"ids": ids, "mask": mask}, mesh)
    assert batch["ids"].sharding.spec == P(("data", "fsdp"), None)
    with jax.set_mesh(mesh):
        actual = jax.jit(lambda m, i, k: m(i, k))(sharded, batch["ids"], batch["mask"])
    assert max_relative_error(np.asarray(actual), expected, mask) <= 1e-5
    assert max_relative_error(np.asarray(actual), hf_logits(hf, ids, mask), mask) <= 1e-5


def test_create_sharded_lays_out_parameters_by_their_logical_axes():
    from forgetjax.models.config import config_from_hf

    config = config_from_hf({"model_type": "qwen2", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
                             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2})
    mesh = make_mesh(data=1, fsdp=4, tensor=2)
    model = create_sharded(lambda: CausalLM(config), mesh)
    kernel = model.layers.mlp.gate_proj.kernel[...]
    assert kernel.sharding.spec == P(None, "fsdp", "tensor")
    assert kernel.addressable_shards[0].data.shape == (2, 8, 24)


def test_no_device_ever_holds_full_parameters_when_creating_or_loading(tmp_path):
    """A fresh process on 8 simulated devices (fsdp=4 x tensor=2) dumps every program XLA compiles while
    `create_sharded` builds the model and while `build_model` loads it from HF tensors. After SPMD partitioning each
    program's shapes are per device, so the largest array in any of them must not exceed the largest parameter
    shard: gate/up/down [2 layers, 32, 48] / 8 = 384 elements, whereas a full copy of even the smallest sharded
    kernel (k_proj, [2, 32, 16]) has 1024. Loading must read at most one shard's block per call."""
    dump = tmp_path / "xla"
    env = {**{k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"},  # compile, do not read back
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]),
           "XLA_FLAGS": f"--xla_force_host_platform_device_count=8 --xla_dump_to={dump}"}
    out = subprocess.run([sys.executable, str(REPO / "tests" / "sharded_creation_probe.py"), str(dump)], env=env,
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    largest_shard = 2 * 32 * 48 // 8
    assert 0 < report["created_largest"] <= largest_shard
    assert report["loaded_largest"] <= largest_shard
    assert 0 < report["largest_read"] <= largest_shard
    for shards in (report["created_shards"], report["loaded_shards"]):
        assert shards == {"gate": [[2, 8, 24]], "embed": [[32, 8]], "lm_head": [[8, 32]]}


def test_non_divisible_dims_stay_replicated():
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    assert logical_to_spec(("layers", "embed", "kv_heads"), (3, 36, 3), mesh) == P(None, "fsdp", None)
    assert logical_to_spec(("batch", "length"), (8, 5), mesh) == P(("data", "fsdp"), None)
    assert logical_to_spec(("batch", "length"), (6, 5), mesh) == P(None, None)
    with pytest.raises(KeyError, match="no rule"):
        logical_to_spec(("unknown_axis",), (4,), mesh)
    with pytest.raises(ValueError, match="devices"):
        make_mesh(data=3, fsdp=1, tensor=1)
