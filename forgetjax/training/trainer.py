"""The one training loop of every method: budgeted, sharded, checkpointed, resumable and logged."""
from __future__ import annotations

import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from forgetjax.distributed import allgather_json, is_writer, process_rows
from forgetjax.models.vocab import DEFAULT_CHUNK, check_logit_chunk, set_logit_chunk
from forgetjax.sampling.sampler import BATCH_BUCKETS, bucket
from forgetjax.sharding import make_mesh, mesh_shape, shard_batch
from forgetjax.training import budget as budgets
from forgetjax.training.budget import BudgetConfig, BudgetUsage
from forgetjax.training.checkpointing import TrainCheckpointer, key_from_json, key_to_json
from forgetjax.training.kl_monitor import KLConfig, KLSummary, context_keys, kl_flops, kl_sums
from forgetjax.training.lora import LoraConfig, apply_lora
from forgetjax.training.memory import MEMORY_FRACTION, MemoryEstimate, device_memory_bytes, fitted_estimate, \
    keeps_start_copy, train_memory_settings
from forgetjax.training.method import Batch, Method, StepContext
from forgetjax.training.metrics import MetricsLogger
from forgetjax.training.optim import OptimizerConfig, learning_rate, make_optimizer
from forgetjax.training.replay import ReplayConfig, replay_counts
from forgetjax.training.step import TrainState, compile_train_step, finalize_metrics, make_train_step, split_model


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; the last good checkpoint is left untouched."""


@dataclasses.dataclass
class MeshConfig:
    data: int = 1
    fsdp: int = -1
    tensor: int = 1

    def make(self):
        """The (data, fsdp, tensor) mesh over every device, or None on a single device."""
        return make_mesh(self.data, self.fsdp, self.tensor) if jax.device_count() > 1 else None

    def shape(self, devices: int) -> tuple[int, int, int]:
        """The (data, fsdp, tensor) sizes `make` lays out on `devices` devices ((1, 1, 1) on one device)."""
        return mesh_shape(self.data, self.fsdp, self.tensor, devices) if devices > 1 else (1, 1, 1)


@dataclasses.dataclass
class CheckpointConfig:
    every: int = 50
    keep: int = 3


@dataclasses.dataclass
class LogConfig:
    every: int = 1
    tensorboard: bool = True
    wandb_project: str | None = None
    progress: bool = True
    peak_flops: float | None = None


@dataclasses.dataclass
class TrainConfig:
    """Everything that defines a training run besides the method's own arguments."""

    model: str = "smollm2-135m-instruct"
    dtype: Literal["float32", "bfloat16"] = "float32"
    param_dtype: Literal["float32", "bfloat16"] | None = None
    remat: Literal["auto", "none", "dots", "full"] = "auto"  # auto: the cheapest that fits (training/memory.py)
    logit_chunk: int = DEFAULT_CHUNK  # tokens per device whose f32 logits a loss holds at once; 0 = all
    # one-token decode steps of the run's own rollouts (GRPO, SPIN/SDFT, DPO pairs): xla reads every cache slot;
    # ragged (GPU) and paged (TPU) read only the written ones (models/attention.py)
    decode_attention: Literal["xla", "ragged", "paged"] = "xla"
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    lora: LoraConfig | None = None
    replay: ReplayConfig | None = None  # a share of every batch's rows from replay data (training/replay.py)
    batch_size: int = 8
    micro_batches: int = 1
    max_length: int = 512
    budget: BudgetConfig = dataclasses.field(default_factory=BudgetConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    log: LogConfig = dataclasses.field(default_factory=LogConfig)
    kl_to_start: KLConfig = dataclasses.field(default_factory=KLConfig)
    seed: int = 0
    out_dir: str = "runs/train"

    def validate(self):
        if self.batch_size < 1 or self.micro_batches < 1 or self.batch_size % self.micro_batches:
            raise ValueError(f"batch_size={self.batch_size} must be a positive multiple of "
                             f"micro_batches={self.micro_batches}")
        if self.max_length < 8:
            raise ValueError(f"max_length must be >= 8, got {self.max_length}")
        check_logit_chunk(self.logit_chunk)
        if self.replay is not None:
            try:
                self.replay.rows(self.batch_size)
            except ValueError as err:
                raise ValueError(f"replay: {err}") from None


@dataclasses.dataclass
class TrainResult:
    status: str
    steps: int
    usage: dict[str, float]
    final_metrics: dict[str, float]
    resumed_from: int | None
    wall_seconds: float
    out_dir: str
    data: dict[str, float] | None = None  # unique, size, epochs (`DataUse.summary`) when the source knows its data
    flags: list[str] = dataclasses.field(default_factory=list)  # `budget.data_flags`
    kl_to_start: dict[str, float] | None = None  # `KLSummary.result` when train.kl_to_start.every > 0
    replay: dict[str, float] | None = None  # unique, size, epochs of the replay records (`train.replay`)
    remat: str | None = None  # the policy the run used (`train.remat`, or the one "auto" chose)
    memory: dict[str, Any] | None = None  # the step's estimate and the device memory (`Trainer.memory_record`)


def measure_peak_flops(dtype=jnp.float32, n: int = 1024) -> float:
    """Measured matmul FLOP/s of one device in the compute dtype: the physical limit MFU is judged against."""
    a = jnp.ones((n, n), dtype)
    mm = jax.jit(jnp.matmul)
    mm(a, a).block_until_ready()
    best = math.inf
    for _ in range(3):
        start = time.perf_counter()
        mm(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best * jax.device_count()


class Trainer:
    """Runs `method` on `model` under `cfg`. Resumes from the newest checkpoint in `cfg.out_dir` when present."""

    def __init__(self, cfg: TrainConfig, model, tokenizer, method: Method, mesh=None):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.method = method
        if cfg.replay is not None and not method.replays:
            from forgetjax.errors import UserError

            raise UserError(f"train.replay: method {method.name} cannot replay (its batches are not SFT rows); "
                            "replay applies to the SFT-family methods")
        self.mesh = mesh if mesh is not None else cfg.mesh.make()
        self.device_bytes = device_memory_bytes()
        self.memory = self._memory_estimate(model.config, model.attention_impl)
        model.remat = self.memory.remat
        if cfg.remat == "auto" and is_writer():
            print(f"forgetjax: remat auto -> {self.memory.remat} (step estimated at "
                  f"{self.memory.total / 2**30:.2f} GiB of {self.device_bytes / 2**30:.1f} GiB per device)",
                  file=sys.stderr)
        if cfg.lora is not None:
            apply_lora(model, cfg.lora, seed=cfg.seed)
            if self.mesh is not None:
                from forgetjax.sharding import shard_model
                model = shard_model(model, self.mesh)
        set_logit_chunk(model, cfg.logit_chunk)
        self.model_config = model.config
        self._compute_dtype = jnp.dtype(model.dtype)
        self.out_dir = Path(cfg.out_dir)
        self.graphdef, trainable, frozen = split_model(model, lora=cfg.lora is not None)
        self.tx = make_optimizer(cfg.optimizer)
        opt_state = jax.jit(self.tx.init, out_shardings=self._opt_state_shardings(trainable))(trainable)
        self.state = TrainState(trainable=trainable, frozen=frozen, opt_state=opt_state, step=0,
                                rng=jax.random.key(cfg.seed))
        self._step_fn = None
        self._start_params = None
        self._kl = KLSummary()

    def _memory_estimate(self, model_config, attention_impl: str) -> MemoryEstimate:
        """The step's bytes per device on this mesh (`forgetjax.training.memory`): under train.remat, or for "auto"
        under the cheapest policy that fits in `MEMORY_FRACTION` of one device; counts the frozen start copy (KL to the
        start, GRPO's reference), the KV cache of the method's largest sampler call and, on the XLA attention path,
        one layer's score blocks."""
        cfg = self.cfg
        shape = dict(self.mesh.shape) if self.mesh is not None else {}
        rows = self.method.sampler_rows(cfg.batch_size)
        settings = {**train_memory_settings(cfg), "reference": keeps_start_copy(cfg, self.method),
                    "rollout_batch": bucket(rows, BATCH_BUCKETS) if rows else 0,
                    "rollout_len": cfg.max_length if rows else 0, "backend": jax.default_backend(),
                    "attention_impl": attention_impl}
        return fitted_estimate(model_config, MEMORY_FRACTION * self.device_bytes, shape.get("data", 1),
                               shape.get("fsdp", 1), shape.get("tensor", 1), **settings)

    def memory_record(self) -> dict[str, Any]:
        """The step's estimate (mesh, policy, bytes by component and in total) and the device memory it was fitted to,
        for train_result.json."""
        return {**dataclasses.asdict(self.memory), "total": self.memory.total, "device": self.device_bytes}

    def start_parameters(self):
        """A frozen copy of the trainable parameters the run starts from, in the compute dtype (the forward pass
        casts every weight to it anyway) and their sharding; made on the first call, which must come before the first
        step or restore (the KL to the start model and GRPO's reference share it)."""
        if self._start_params is None:
            if self.state.step != 0:
                raise RuntimeError("start_parameters() must first be called before training starts")
            compute = self._compute_dtype

            def frozen_copy(x):  # always a new buffer: the train step donates the live ones
                if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != compute:
                    return x.astype(compute)
                return x.copy()

            self._start_params = jax.tree.map(frozen_copy, self.state.trainable)
        return self._start_params

    def _kl_contexts(self, batch: Batch) -> tuple[tuple[str, str], ...]:
        """The contexts the KL to the start model is measured on for this batch; () when this step is not measured."""
        every = self.cfg.kl_to_start.every
        if not every or (self.state.step + 1) % every:
            return ()
        return context_keys(batch.arrays, self.method.kl_contexts)

    def _with_kl_cost(self, batch: Batch) -> Batch:
        """`batch` with the FLOPs of its KL measurement added to its `reference` component (global over processes)."""
        contexts = self._kl_contexts(batch)
        if not contexts:
            return batch
        cost = kl_flops(self.model_config, batch.arrays, contexts)
        if batch.process_local and jax.process_count() > 1:
            cost = float(sum(allgather_json(cost)))
        extra = dict(batch.extra_flops)
        extra["reference"] = extra.get("reference", 0.0) + cost
        return dataclasses.replace(batch, extra_flops=extra)

    def _opt_state_shardings(self, trainable):
        """Optimiser moments take their parameters' shardings; counters and scalars are replicated."""
        abstract = jax.eval_shape(self.tx.init, trainable)
        if self.mesh is None:
            device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            return jax.tree.map(lambda _: device, abstract)
        params_def = jax.tree.structure(trainable)
        param_shardings = jax.tree.map(lambda x: x.sharding, trainable)
        replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        mirrors_params = lambda node: jax.tree.structure(node) == params_def  # noqa: E731
        return jax.tree.map(lambda node: param_shardings if mirrors_params(node) else replicated, abstract,
                            is_leaf=mirrors_params)

    def current_model(self):
        """The model with the current parameters (shares arrays with the train state; do not mutate)."""
        return nnx.merge(self.graphdef, self.state.trainable, self.state.frozen)

    def _held_rows(self, batch: Batch) -> slice:
        """Which rows of the global batch `batch.arrays` hold (all of them unless the batch is process-local)."""
        if batch.process_local:
            return process_rows(self.mesh, self.cfg.batch_size)
        return slice(0, len(next(iter(batch.arrays.values()))))

    def _counts(self, batch: Batch, held: slice, count: int) -> tuple[int, int]:
        """(`count` summed over the global batch's rows before `held`, summed over all rows), from this process's
        `count` over its rows `held` (a collective for process-local batches of multi-process runs)."""
        if not batch.process_local or jax.process_count() == 1:
            return 0, count
        by_start = {start: value for start, value in allgather_json([held.start, count])}
        return sum(v for start, v in by_start.items() if start < held.start), sum(by_start.values())

    def _trim(self, batch: Batch, usage: BudgetUsage, flops_per_token: float) -> Batch:
        """Cut the batch so the budget ends exactly: the first rows (example budgets) or the first real tokens in
        row-major order of the global batch (token and FLOPs budgets)."""
        cfg = self.cfg.budget
        if self.method.trim == "none":
            return batch
        held = self._held_rows(batch)
        if cfg.kind == "examples" and usage.examples + batch.examples > cfg.value:
            keep = int(cfg.value - usage.examples)
            arrays = budgets.trim_rows(batch.arrays, keep - held.start)
            local = int(sum(v.sum() for k, v in arrays.items() if k.endswith("attention_mask")))
            return dataclasses.replace(batch, arrays=arrays, examples=keep, tokens=self._counts(batch, held, local)[1])
        allowed = budgets.tokens_within(cfg, usage, flops_per_token) - batch.extra_total / flops_per_token * (
            cfg.kind == "flops")
        if batch.tokens > allowed and self.method.trim == "tokens":
            keep = max(int(allowed), 0)
            before, _ = self._counts(batch, held, int(batch.arrays["attention_mask"].sum()))
            arrays = budgets.trim_tokens(batch.arrays, keep - before)
            _, rows = self._counts(batch, held, int(arrays["attention_mask"].any(axis=1).sum()))
            return dataclasses.replace(batch, arrays=arrays, tokens=keep, examples=min(batch.examples, rows))
        return batch

    def _save(self, checkpointer: TrainCheckpointer, source, usage: BudgetUsage) -> None:
        meta = {"step": self.state.step, "rng": key_to_json(self.state.rng), "data_state": source.get_state(),
                "usage": dataclasses.asdict(usage), "kl_to_start": dataclasses.asdict(self._kl)}
        checkpointer.save(self.state.step, self.state.trainable, self.state.opt_state, meta)

    def fit(self) -> TrainResult:
        cfg = self.cfg
        start_time = time.time()
        if is_writer():
            self.out_dir.mkdir(parents=True, exist_ok=True)
        checkpointer = TrainCheckpointer(self.out_dir / "checkpoints", keep=cfg.checkpoint.keep)
        logger = MetricsLogger(self.out_dir, tensorboard=cfg.log.tensorboard, wandb_project=cfg.log.wandb_project,
                               run_name=self.out_dir.name)
        source = self.method.batch_source(self)
        if cfg.kl_to_start.every:
            self.start_parameters()
        usage = BudgetUsage()
        resumed_from = None
        restored = checkpointer.restore_latest(self.state.trainable, self.state.opt_state)
        if restored is not None:
            step, trainable, opt_state, meta = restored
            self.state = dataclasses.replace(self.state, trainable=trainable, opt_state=opt_state, step=step,
                                             rng=key_from_json(meta["rng"]))
            source.set_state(meta["data_state"])
            usage = BudgetUsage(**meta["usage"])
            self._kl = KLSummary(**meta.get("kl_to_start", {}))
            resumed_from = step
            logger.truncate_after(step)
            print(f"forgetjax: resumed from checkpoint step {step} in {checkpointer.directory}", file=sys.stderr)
        flops_per_token = self.method.flops_per_token(self)
        peak = cfg.log.peak_flops or measure_peak_flops(jnp.dtype(cfg.dtype))
        progress_bar = None
        if cfg.log.progress and is_writer():
            from tqdm import tqdm

            progress_bar = tqdm(total=float(cfg.budget.value), initial=usage.amount(cfg.budget.kind),
                                desc=f"train {self.method.name}", unit=cfg.budget.kind, dynamic_ncols=True)
        status, last_metrics, last_saved = "budget_reached", {}, self.state.step
        try:
            while not budgets.exhausted(cfg.budget, usage):
                context = StepContext(current_model=self.current_model, step=self.state.step,
                                      rng=jax.random.fold_in(self.state.rng, 2 * self.state.step + 1),
                                      mesh=self.mesh)
                batch = source.next_batch(context)
                if batch is None:
                    status = "data_exhausted"
                    break
                extra = batch.extra_flops
                batch = self._trim(self._with_kl_cost(batch), usage, flops_per_token)  # trims within its cost
                batch = self._with_kl_cost(dataclasses.replace(batch, extra_flops=extra))  # the cost kept rows have
                if batch.tokens == 0:
                    break  # the budget cannot fit one more token (FLOP budgets end within one token's cost)
                self._count_replay(batch, usage)
                last_metrics = self._run_step(batch, usage, flops_per_token, peak)
                last_metrics.update(batch.info)
                if self.state.step % cfg.log.every == 0:
                    logger.log(self.state.step, last_metrics)
                if progress_bar is not None:
                    progress_bar.n = min(usage.amount(cfg.budget.kind), float(cfg.budget.value))
                    progress_bar.set_postfix(loss=f"{last_metrics['loss']:.4f}", refresh=False)
                    progress_bar.refresh()
                if self.state.step % cfg.checkpoint.every == 0:
                    self._save(checkpointer, source, usage)
                    last_saved = self.state.step
            if self.state.step != last_saved or not checkpointer.steps():
                self._save(checkpointer, source, usage)
        finally:
            if progress_bar is not None:
                progress_bar.close()
            logger.close()
        use = source.data_use() if hasattr(source, "data_use") else None
        data = use.summary() if use is not None else None
        flags = budgets.data_flags(cfg.budget, data and data["epochs"], status == "data_exhausted")
        replay = source.replay_use() if cfg.replay is not None else None
        result = TrainResult(status=status, steps=self.state.step, usage=dataclasses.asdict(usage),
                             final_metrics=last_metrics, resumed_from=resumed_from,
                             wall_seconds=time.time() - start_time, out_dir=str(self.out_dir), data=data, flags=flags,
                             kl_to_start=self._kl.result(),
                             replay=replay.summary() if replay is not None else None,
                             remat=self.memory.remat, memory=self.memory_record())
        if is_writer():
            from forgetjax.io import write_json_atomic

            write_json_atomic(self.out_dir / "train_result.json", dataclasses.asdict(result))
        return result

    def _count_replay(self, batch: Batch, usage: BudgetUsage) -> None:
        """Add the replay rows' real tokens and examples of the (trimmed) global batch to `usage`."""
        if batch.replay_rows is None:
            return
        tokens, examples = replay_counts(batch.arrays, batch.replay_rows)
        held = self._held_rows(batch)
        usage.replay_tokens += self._counts(batch, held, tokens)[1]
        usage.replay_examples += self._counts(batch, held, examples)[1]

    def _run_step(self, batch: Batch, usage: BudgetUsage, flops_per_token: float, peak: float) -> dict[str, Any]:
        arrays = batch.arrays
        if self.mesh is not None:
            arrays = shard_batch(arrays, self.mesh, process_local=batch.process_local)
        if self._step_fn is None:
            step = make_train_step(self.graphdef, self.method.loss, self.tx, micro_batches=self.cfg.micro_batches)
            self._step_fn = compile_train_step(step, self.state, arrays, self.mesh)
        lr = learning_rate(self.cfg.optimizer, budgets.progress(self.cfg.budget, usage))
        step_key = jax.random.fold_in(self.state.rng, 2 * self.state.step)
        start = time.perf_counter()
        if self.mesh is not None:
            with jax.set_mesh(self.mesh):
                trainable, opt_state, metrics = self._step_fn(self.state.trainable, self.state.frozen,
                                                              self.state.opt_state, arrays, step_key, jnp.float32(lr))
        else:
            trainable, opt_state, metrics = self._step_fn(self.state.trainable, self.state.frozen,
                                                          self.state.opt_state, arrays, step_key, jnp.float32(lr))
        values = finalize_metrics(metrics)
        seconds = time.perf_counter() - start
        if not np.isfinite(values["loss"]) or not np.isfinite(values["grad_norm"]):
            raise TrainingDiverged(
                f"non-finite loss ({values['loss']}) or grad norm ({values['grad_norm']}) at step "
                f"{self.state.step + 1} of {self.method.name}; the update was discarded and the last good "
                f"checkpoint in {self.out_dir / 'checkpoints'} is untouched")
        contexts = self._kl_contexts(batch)
        self.state = dataclasses.replace(self.state, trainable=trainable, opt_state=opt_state,
                                         step=self.state.step + 1)
        if contexts:
            values["kl_to_start"] = self._measure_kl(arrays, contexts)
        train_flops = flops_per_token * batch.tokens
        usage.add(batch.tokens, batch.examples, train_flops, batch.extra_flops)
        values.update({"lr": lr, "tokens": batch.tokens, "examples": batch.examples,
                       "tokens_per_s": batch.tokens / seconds, "step_seconds": seconds,
                       "mfu": train_flops / seconds / peak, "budget_used": usage.amount(self.cfg.budget.kind),
                       "train_flops": train_flops,
                       **{f"{name}_flops": value for name, value in batch.extra_flops.items()}})
        return values

    def _measure_kl(self, arrays: dict, contexts: tuple[tuple[str, str], ...]) -> float | None:
        """Mean KL(policy || start) per loss-mask token of the (sharded) batch under the current parameters."""
        args = (self.graphdef, self.state.trainable, self.state.frozen, self.start_parameters(), arrays, contexts)
        if self.mesh is not None:
            with jax.set_mesh(self.mesh):
                total, count = kl_sums(*args)
        else:
            total, count = kl_sums(*args)
        total, count = float(total), float(count)
        if not count:
            return None
        self._kl.add(total / count)
        return total / count
