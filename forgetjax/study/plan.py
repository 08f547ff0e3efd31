"""`forgetjax plan`: per-device memory of each model scale on a topology, the mesh and remat policy the study would
use, and its teacher stages.

A training run's memory is `forgetjax.training.memory.estimate` (parameters, gradients, moments, activations, one
logits chunk, the frozen start copy, the rollout KV cache). The rollout KV cache is by default the largest sampler
call of the study's own methods (`study_rollouts`: rows as the sampler pads them, train.max_length tokens, which
bound prompt + generation), not a fixed guess.
A teacher stage (the SF-/CF-SFT teacher's generations, built once per stage id and shared by every cell naming it)
is planned on its own, once per stage (`teacher_stage_plan`): the teacher's weights in the stage dtype and the KV
cache of one chunk's generation batch, both sharded over every device (the stage's mesh is fsdp over all of them),
plus one decode step's float32 logits per local row; its time is the larger of the generation FLOPs at the devices'
peak and the decode bandwidth floor (every decode step reads the local weights and KV cache once).
A run is sized on the mesh its trainer will build from `train.mesh` on the topology; where that cannot be laid out or
does not fit, `choose_mesh` suggests the smallest fsdp (x tensor) group that fits in 85% of HBM (`MEMORY_FRACTION`),
the remaining devices as data. Under `train.remat: auto` each mesh takes the cheapest remat policy that fits there, as
the trainer does on its own mesh. The frozen start copy is counted where a run keeps one (`study_references`).
"""
from __future__ import annotations

import dataclasses
import math
import re

from forgetjax.errors import UserError
from forgetjax.models.config import ModelConfig
from forgetjax.training.memory import MEMORY_FRACTION, MemoryEstimate, fitted_estimate, keeps_start_copy

HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32, "h100": 80, "h200": 141, "b200": 180, "a100": 80,
           "a100-40": 40, "l4": 24, "cpu": 24}
CORES_PER_CHIP = {"v4": 2, "v5p": 2, "v5e": 1, "v6e": 1}
# Dense bf16 peak (TFLOP/s) and HBM bandwidth (GB/s) per device from the vendors' data sheets; "cpu" is a nominal
# host so that CPU plans print something.
PEAK_TFLOPS = {"v4": 275, "v5e": 197, "v5p": 459, "v6e": 918, "h100": 989, "h200": 989, "b200": 2250, "a100": 312,
               "a100-40": 312, "l4": 121, "cpu": 1}
HBM_GBPS = {"v4": 1228, "v5e": 819, "v5p": 2765, "v6e": 1640, "h100": 3350, "h200": 4800, "b200": 8000,
            "a100": 2039, "a100-40": 1555, "l4": 300, "cpu": 50}


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str
    devices: int
    hbm_bytes: int
    peak_flops: float = PEAK_TFLOPS["cpu"] * 1e12
    hbm_bandwidth: float = HBM_GBPS["cpu"] * 1e9
    backend: str = "cpu"  # as jax names it: decides the attention kernel (`models.attention.choose_implementation`)


def _topology(name: str, kind: str, devices: int) -> Topology:
    backend = "tpu" if kind in CORES_PER_CHIP else "cpu" if kind == "cpu" else "gpu"
    return Topology(name, devices, HBM_GIB[kind] * 2**30, PEAK_TFLOPS[kind] * 1e12, HBM_GBPS[kind] * 1e9, backend)


def parse_topology(text: str) -> Topology:
    """`v5p-64` (cores, as GCP names them), `v5e-16`, `gpu:8`, `gpu:8:a100-40`, `cpu:8`."""
    tpu = re.fullmatch(r"(v4|v5e|v5p|v6e)-(\d+)", text)
    if tpu:
        kind, cores = tpu.group(1), int(tpu.group(2))
        chips = max(cores // CORES_PER_CHIP[kind], 1)
        return _topology(text, kind, chips)
    gpu = re.fullmatch(r"(gpu|cpu):(\d+)(?::([\w-]+))?", text)
    if gpu:
        kind = gpu.group(3) or ("h100" if gpu.group(1) == "gpu" else "cpu")
        if kind not in HBM_GIB:
            raise UserError(f"--topology {text!r}: unknown device kind {kind!r}; known: {sorted(HBM_GIB)}")
        if int(gpu.group(2)) < 1:
            raise UserError(f"--topology {text!r}: the device count must be >= 1")
        return _topology(text, kind, int(gpu.group(2)))
    raise UserError(f"--topology {text!r}: expected e.g. v5p-64, v5e-16, v4-32, gpu:8, gpu:8:a100-40 or cpu:8")


@dataclasses.dataclass(frozen=True)
class Rollouts:
    """The largest sampler call of a scale's training runs: rows (padded to the sampler's batch bucket) x length."""

    rows: int = 0
    length: int = 0
    method: str | None = None


def _training_runs(cells):
    """(cell, method name, method args, TrainConfig) of every training run of the study: each cell's run and its
    pipeline stages' runs, resolved as the trainer will see them."""
    from forgetjax.config import from_dict
    from forgetjax.methods.registry import get_method_spec
    from forgetjax.training.trainer import TrainConfig

    for cell in cells:
        runs = [cell.run] if cell.run else []
        if cell.pipeline is not None:
            runs += [stage.run for stage in cell.pipeline.stages]
        for run in runs:
            args = from_dict(get_method_spec(run["method"]).args_class, run.get("method_args") or {},
                             source=f"{cell.cell_id}: method_args")
            yield cell, run["method"], args, from_dict(TrainConfig, run["train"], source=f"{cell.cell_id}: train")


def study_rollouts(cells) -> dict[str, Rollouts]:
    """Per scale, the largest KV cache the study's training runs (cells and pipeline stages) ask of the sampler that
    decodes the model being trained: each method's `sampler_rows(batch_size)` (methods that never sample it have
    none; SF-/CF-SFT teachers are planned as teacher stages) padded to the sampler's batch bucket, times
    train.max_length tokens. A scale whose methods never sample gets Rollouts()."""
    from forgetjax.sampling.sampler import BATCH_BUCKETS, bucket

    largest: dict[str, Rollouts] = {}
    for cell, method, args, train in _training_runs(cells):
        if not hasattr(args, "sampler_rows"):
            continue
        candidate = Rollouts(bucket(args.sampler_rows(train.batch_size), BATCH_BUCKETS), train.max_length, method)
        best = largest.get(cell.scale, Rollouts())
        if candidate.rows * candidate.length > best.rows * best.length:
            largest[cell.scale] = candidate
    return largest


def study_references(cells) -> dict[str, bool]:
    """Per scale, whether any training run keeps a frozen copy of its starting parameters, as the trainer decides
    it: the run measures the KL to the start (train.kl_to_start.every > 0) or its method's args keep the start
    (`keeps_start`: GRPO with beta > 0)."""
    keeps: dict[str, bool] = {}
    for cell, _, args, train in _training_runs(cells):
        keeps[cell.scale] = keeps.get(cell.scale, False) or keeps_start_copy(train, args)
    return keeps


def choose_mesh(config: ModelConfig, topology: Topology, **kwargs) -> MemoryEstimate:
    """Smallest model-parallel group (fsdp first, tensor up to 8) that fits in `MEMORY_FRACTION` of HBM, data takes
    the rest; under remat "auto" each mesh is tried with the cheapest policy that fits on it. The attention kernel is
    the topology's backend's unless `backend` says otherwise."""
    kwargs.setdefault("backend", topology.backend)
    budget = MEMORY_FRACTION * topology.hbm_bytes
    best = None
    for tensor in (1, 2, 4, 8):
        if topology.devices % tensor:
            continue
        fsdp = 1
        while fsdp * tensor <= topology.devices:
            if topology.devices % (fsdp * tensor) == 0:
                data = topology.devices // (fsdp * tensor)
                est = fitted_estimate(config, budget, data, fsdp, tensor, **kwargs)
                if est.total <= budget:
                    return est
                best = est if best is None or est.total < best.total else best
            fsdp *= 2
    return best


@dataclasses.dataclass(frozen=True)
class TeacherStagePlan:
    """Bytes per device and time of one teacher stage (see the module docstring)."""

    weights: float
    kv_cache: float
    logits: float
    flops: float
    compute_seconds: float
    bandwidth_seconds: float

    @property
    def total(self) -> float:
        return self.weights + self.kv_cache + self.logits

    @property
    def seconds(self) -> float:
        return max(self.compute_seconds, self.bandwidth_seconds)


def teacher_stage_plan(config: ModelConfig, topology: Topology, *, prompts: int, samples: int,
                       prompts_per_chunk: int, prompt_len: int, new_tokens: int,
                       compute_bytes: int = 2) -> TeacherStagePlan:
    """A teacher generating `samples` completions of `new_tokens` tokens for each of `prompts` prompts of
    `prompt_len` tokens, `prompts_per_chunk` prompts at a time, on every device of `topology`."""
    devices = topology.devices
    rows = prompts_per_chunk * samples
    length = prompt_len + new_tokens
    weights = config.num_params() * compute_bytes / devices
    kv_cache = 2 * config.num_layers * rows * length * config.kv_size * compute_bytes / devices
    logits = math.ceil(rows / devices) * config.vocab_size * 4
    flops = config.forward_flops([length] * (prompts * samples))
    decode_steps = math.ceil(prompts / prompts_per_chunk) * new_tokens
    return TeacherStagePlan(weights, kv_cache, logits, flops, flops / (devices * topology.peak_flops),
                            decode_steps * (weights + kv_cache) / topology.hbm_bandwidth)


def format_bytes(value: float) -> str:
    return f"{value / 2**30:8.2f} GiB"


def teacher_stages(cfg) -> dict[str, tuple[dict, int]]:
    """{stage id: (stage key, number of cells sharing the stage)} of a study's teacher stages
    (`forgetjax.methods.distill.teacher_stage_key`), those of pipeline stages included."""
    from forgetjax.study.matrix import expand, teacher_stage

    stages: dict[str, tuple[dict, int]] = {}
    for cell in expand(cfg):
        runs = [(s.teacher_stage, s.run) for s in cell.pipeline.stages] if cell.pipeline else [
            (cell.teacher_stage, cell.run)]  # a pipeline cell: the teacher stages of every stage on its path
        for stage_id, run in runs:
            if stage_id:
                key, count = stages.get(stage_id) or (teacher_stage(run)[1], 0)
                stages[stage_id] = (key, count + 1)
    return stages


def stage_prompts(domain: dict) -> int | None:
    """The number of training problems of a domain config, counted in its data directory; its `limit` when the
    data is not there (None when it has none)."""
    from forgetjax.config import from_dict
    from forgetjax.envs import load_training_problems
    from forgetjax.methods.run import DomainConfig

    try:
        return len(load_training_problems(from_dict(DomainConfig, domain, source="domain")))
    except (OSError, UserError, ValueError):
        return domain.get("limit")

