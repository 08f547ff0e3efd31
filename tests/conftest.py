"""Shared fixtures. Eight simulated CPU devices are configured before JAX is imported so that mesh tests run in
the same session as single-device ones (arrays land on device 0 unless a test shards them)."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _data_dir() -> Path:
    return Path(os.environ.get("FORGETJAX_DATA_DIR", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = _data_dir()
    if not path.is_dir():
        pytest.skip(f"benchmark data directory {path} not found (set FORGETJAX_DATA_DIR)")
    return path


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the embedded SmolLM2-135M-Instruct in float32."""
    import forgetjax

    return forgetjax.load("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smollm2_gguf():
    from forgetjax.assets import embedded_gguf

    return embedded_gguf("smollm2-135m-instruct")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("FORGETJAX_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow test: set FORGETJAX_SLOW=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
