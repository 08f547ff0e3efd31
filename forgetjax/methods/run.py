"""A training run's full configuration (`forgetjax train CONFIG.yaml key=value ...`) and its driver: the registered
method it names, trained by the Trainer."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from forgetjax.tasks.domains import DomainName
from forgetjax.training.trainer import TrainConfig, TrainResult, Trainer


@dataclasses.dataclass
class DomainConfig:
    """Where training problems come from (see forgetjax.envs.load_problems) and how they are prompted."""

    name: DomainName = "math"
    source: str = "gsm8k"
    split: str = "train"
    limit: int | None = None
    data_dir: str | None = None
    template: str | None = None
    seed: int = 0


@dataclasses.dataclass
class RunConfig:
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    method: str = "gt_sft"
    method_args: dict[str, Any] = dataclasses.field(default_factory=dict)
    domain: DomainConfig = dataclasses.field(default_factory=DomainConfig)

    def validate(self):
        from forgetjax.methods.catalog import METHODS

        if self.method not in METHODS:
            raise ValueError(f"method: unknown method {self.method!r}; known: {', '.join(sorted(METHODS))}")


def load_run_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    from forgetjax.config import load_config

    return load_config(RunConfig, path, list(overrides))


def run_training(cfg: RunConfig, *, source: str = "<config>", model=None, tokenizer=None, mesh=None) -> TrainResult:
    """Load the start model, build the method, train to the budget (resuming if checkpoints exist), and save the
    final model as a forgetjax checkpoint in `<out_dir>/final` (the input of evaluation and export). The training
    state's host memory is released before returning (`forgetjax.host_memory`), so a study's next phase does not
    carry it."""
    from forgetjax.host_memory import release_host_memory

    result = _train_and_save(cfg, source, model, tokenizer, mesh)
    release_host_memory()
    return result


def _train_and_save(cfg: RunConfig, source: str, model, tokenizer, mesh) -> TrainResult:
    import jax.numpy as jnp

    import forgetjax
    from forgetjax.config import ConfigError, dump_yaml
    from forgetjax.distributed import is_writer
    from forgetjax.methods.registry import build_method
    from forgetjax.models.attention import check_decode_attention

    try:
        check_decode_attention(cfg.train.decode_attention)
    except ValueError as err:
        raise ConfigError(f"train.decode_attention: {err}") from None
    method = build_method(cfg.method, cfg.method_args, cfg.domain, source=source)
    out_dir = Path(cfg.train.out_dir)
    if is_writer():
        out_dir.mkdir(parents=True, exist_ok=True)
        dump_yaml(cfg, out_dir / "config.yaml")
    if mesh is None:
        mesh = cfg.train.mesh.make()
    if model is None:
        model, tokenizer = forgetjax.load(cfg.train.model, dtype=jnp.dtype(cfg.train.dtype),
                                          param_dtype=jnp.dtype(cfg.train.param_dtype or cfg.train.dtype),
                                          remat="none" if cfg.train.remat == "auto" else cfg.train.remat,
                                          mesh=mesh)  # the Trainer sets the policy "auto" chooses
    model.decode_attention = cfg.train.decode_attention  # before the Trainer takes the model's graph
    trainer = Trainer(cfg.train, model, tokenizer, method, mesh=mesh)
    result = trainer.fit()
    from forgetjax.training.lora import merge_lora

    forgetjax.save_model(merge_lora(trainer.current_model()), tokenizer, out_dir / "final",
                         extra={"method": cfg.method, "start": cfg.train.model, "steps": result.steps})
    return result
