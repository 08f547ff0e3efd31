"""forgetjax: a JAX-native framework for studying what post-training makes language models forget.

`forgetjax.load(source)` -> (model, tokenizer); `forgetjax.export_hf(model, tokenizer, out_dir)`. The heavy modules
are imported on first use so that light submodules (verifiers, analysis) import quickly.
"""

__version__ = "0.1.0"

_LAZY = {
    "load": ("forgetjax.api", "load"),
    "export_hf": ("forgetjax.convert.hf", "export_hf"),
    "save_model": ("forgetjax.convert.checkpoint", "save_model"),
    "make_mesh": ("forgetjax.sharding", "make_mesh"),
    "CausalLM": ("forgetjax.models.decoder", "CausalLM"),
    "ModelConfig": ("forgetjax.models.config", "ModelConfig"),
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'forgetjax' has no attribute {name!r}")
