"""Shared fixtures and requirement helpers.

Eight simulated CPU devices are configured before JAX is imported so that mesh tests run in the same session as
single-device ones (arrays land on device 0 unless a test shards them); the device-count flag is appended to any
XLA_FLAGS already set (replacing a device count given there), so mesh tests never lose their devices.

Compiled programs are kept for the session in a persistent JAX compilation cache (a temporary directory, removed at
the end; an existing JAX_COMPILATION_CACHE_DIR is used as it is): the study runs' subprocesses and repeated trainers
compile the same small programs again and again, and reading them back saved 18% of tests/test_stages.py's time.
Programs are cached however fast they compiled (JAX's default keeps only those over 1 s; the tests' many sub-second
programs recur across tests: 13-20% of tests/test_vocab.py + test_axes.py). Compile-count tests read jit's own
trace cache, which the persistent cache does not touch.
Subprocesses that read XLA's dumps of what it compiled remove the variable from their environment.

`require_data` / `require_module` / `require` skip a test whose benchmark data or required package is missing, except
under CI (CI=true), where a missing requirement fails the test: CI cannot be green by skipping."""
import importlib
import os

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
os.environ["XLA_FLAGS"] = " ".join(
    [flag for flag in os.environ.get("XLA_FLAGS", "").split() if not flag.startswith(DEVICE_COUNT_FLAG)]
    + [f"{DEVICE_COUNT_FLAG}=8"])
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_SESSION_COMPILE_CACHE = None
if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    import tempfile

    _SESSION_COMPILE_CACHE = tempfile.mkdtemp(prefix="forgetjax-tests-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _SESSION_COMPILE_CACHE
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("FORGETJAX_DATA_DIR", REPO.parent / "shared" / "data"))


def on_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def require(condition: bool, reason: str) -> None:
    """Skip (locally) or fail (CI=true) the calling test, or the module at import time, unless `condition`."""
    if condition:
        return
    if on_ci():
        pytest.fail(f"required under CI: {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def require_data(path: Path = DATA_DIR) -> Path:
    """`path` (default: the benchmark data directory) if it exists; see `require`."""
    path = Path(path)
    require(path.exists(), f"benchmark data {path} not found (set FORGETJAX_DATA_DIR)")
    return path


def require_module(name: str):
    """The imported module `name`; see `require`."""
    try:
        return importlib.import_module(name)
    except ImportError as err:
        require(False, f"required package {name!r} is not importable ({err})")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return require_data(DATA_DIR)


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the embedded SmolLM2-135M-Instruct in float32."""
    import forgetjax

    return forgetjax.load("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen2 HF directory (d 64, 4 heads over 2 kv heads, vocabulary 160); a test module may define its
    own `tiny_dir` instead."""
    from tiny_models import make_hf_model

    path = tmp_path_factory.mktemp("tiny")
    make_hf_model(path, "qwen2", hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=160)
    return path


@pytest.fixture(scope="session")
def smollm2_gguf():
    from forgetjax.assets import embedded_gguf

    return embedded_gguf("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_gguf):
    """The same GGUF file loaded by transformers (its own dequantisation; float32, eval mode): the independent
    reference for the embedded model. Loading takes ~25 s, so it is shared."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name,
                                                dtype=torch.float32).eval()


def pytest_sessionfinish(session, exitstatus):
    if _SESSION_COMPILE_CACHE is not None:
        import shutil

        shutil.rmtree(_SESSION_COMPILE_CACHE, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    if os.environ.get("FORGETJAX_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow test: set FORGETJAX_SLOW=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
