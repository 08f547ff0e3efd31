"""Environments for online post-training: problems of the math / code / QA domains and their GEM environments.

`load_problems(domain, source, data_dir, split, limit=None, seed=0)` reads local records into `Problem`s (see
`problems.py` for the sources, splits and which of them are held out); `make_gem_env(problems, ...)` builds the GEM
environment serving them, with rewards from `forgetjax.verifiers.rewards.RewardPool` (see `gem_env.py` for where
and why GEM's reward is replaced). GEM itself is imported only when `make_gem_env` or the wrapper is first used.
"""

from forgetjax.envs.problems import (
    DOMAINS,
    HUMANEVAL_TEMPLATE,
    SOURCES,
    TEMPLATES,
    Problem,
    default_data_dir,
    default_template,
    is_held_out,
    load_problems,
    load_training_problems,
    require_training_pool,
)

_LAZY = {name: "forgetjax.envs.gem_env" for name in ("GEM_ENV_IDS", "VerifiedRewardEnv", "gem_env_id", "gem_records",
                                                      "make_gem_env")}

__all__ = [
    "DOMAINS",
    "HUMANEVAL_TEMPLATE",
    "SOURCES",
    "TEMPLATES",
    "Problem",
    "default_data_dir",
    "default_template",
    "is_held_out",
    "load_problems",
    "load_training_problems",
    "require_training_pool",
    *sorted(_LAZY),
]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'forgetjax.envs' has no attribute {name!r}")
