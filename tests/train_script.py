"""Subprocess entry for kill/resume tests: train the synthetic method on a tiny model, then save final params."""
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402

import forgetjax  # noqa: E402
from forgetjax.training.budget import BudgetConfig  # noqa: E402
from forgetjax.training.optim import OptimizerConfig  # noqa: E402
from forgetjax.training.trainer import CheckpointConfig, LogConfig, TrainConfig, Trainer  # noqa: E402
from synthetic_method import SyntheticSFT  # noqa: E402


def main(model_dir: str, out_dir: str, steps: int, sleep_per_step: float = 0.0) -> None:
    from flax import nnx

    model, tokenizer = forgetjax.load(model_dir)
    cfg = TrainConfig(model=model_dir, batch_size=4, micro_batches=2, max_length=32,
                      budget=BudgetConfig("steps", steps), checkpoint=CheckpointConfig(every=1, keep=3),
                      log=LogConfig(progress=False, tensorboard=False, peak_flops=1e11),
                      optimizer=OptimizerConfig(lr=1e-3, warmup_ratio=0.1, weight_decay=0.01), out_dir=out_dir)
    method = SyntheticSFT(151, 4, 32)
    if sleep_per_step:
        import time

        original = method.batch_source

        def slow_source(trainer):
            source = original(trainer)
            fetch = source.next_batch

            def next_batch(context):
                time.sleep(sleep_per_step)
                return fetch(context)

            source.next_batch = next_batch
            return source

        method.batch_source = slow_source
    trainer = Trainer(cfg, model, tokenizer, method)
    trainer.fit()
    params = nnx.to_pure_dict(trainer.state.trainable)
    flat = {"/".join(map(str, k)): np.asarray(v) for k, v in _flatten(params)}
    np.savez(os.path.join(out_dir, "final_params.npz"), **flat)


def _flatten(tree, prefix=()):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _flatten(value, prefix + (key,))
    else:
        yield prefix, tree


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]) if len(sys.argv) > 4 else 0.0)
