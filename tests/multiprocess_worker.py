"""One process of a simulated multi-host job (tests/test_multiprocess.py): `python multiprocess_worker.py SPEC PID N
PORT`. With N > 1 it joins `jax.distributed` on 127.0.0.1:PORT (CPU collectives over gloo); with N = 1 it is the
single-process reference. Modes (SPEC "mode"):

- "train": GT-SFT on a records file through `run_training` (final orbax model), then the final model is restored
  on the mesh and exported to HF. Each step's process-local batch rows are dumped to SPEC "dump_dir". With
  "pause_after" the job stops after that checkpoint is saved (a marker file says so) and waits to be killed.
- "grpo": one `Sampler.generate_tokens` call, then GRPO with scripted rewards; completions and every step's batch
  arrays are dumped per process.

With SPEC "audit" = {"root", "log"}, process 1 logs every Python-level file write under "root" (audit hook) to
"log", so the test can check that it wrote nothing but orbax's collective checkpoint files.
"""
import json
import os
import sys
import time

import jax

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def install_write_audit(root: str, log_path: str) -> None:
    """Append 'event path' lines for writes under `root` (open for writing, create, rename, delete, mkdir)."""
    root = os.path.realpath(root)
    log = open(log_path, "a", buffering=1)
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def under_root(path) -> str | None:
        if isinstance(path, int) or path is None:
            return None
        path = os.path.realpath(os.fsdecode(os.fspath(path)))
        return path if path == root or path.startswith(root + os.sep) else None

    def hook(event, args):
        paths = []
        if event == "open":
            path, mode, flags = args
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool((flags or 0) & write_flags)
            paths = [path] if writing else []
        elif event in ("os.rename", "os.replace", "os.link", "os.symlink"):
            paths = list(args[:2])
        elif event in ("os.remove", "os.rmdir", "shutil.rmtree", "os.truncate", "shutil.move", "shutil.copyfile"):
            paths = [args[0]]
        elif event == "os.mkdir":
            paths = [] if os.path.exists(os.fspath(args[0])) else [args[0]]
        for path in paths:
            hit = under_root(path)
            if hit is not None:
                log.write(f"{event} {hit}\n")

    sys.addaudithook(hook)


def train(spec, mesh):
    import numpy as np

    import forgetjax
    from forgetjax.config import from_dict
    from forgetjax.methods.sft import SFTBatchSource
    from forgetjax.training import checkpointing
    from forgetjax.methods.run import RunConfig, run_training

    pid = jax.process_index()
    original_next = SFTBatchSource.next_batch

    def next_batch(self, context):
        batch = original_next(self, context)
        if batch is not None:
            np.savez(os.path.join(spec["dump_dir"], f"batch.p{pid}.s{context.step}.npz"), **batch.arrays)
        return batch

    SFTBatchSource.next_batch = next_batch
    original_save = checkpointing.TrainCheckpointer.save

    def save(self, step, *args):
        original_save(self, step, *args)
        if step == spec.get("pause_after"):
            with open(os.path.join(spec["dump_dir"], f"paused.p{pid}"), "w") as marker:
                marker.write(str(step))
            time.sleep(3600)

    checkpointing.TrainCheckpointer.save = save
    cfg = from_dict(RunConfig, spec["run"], source="multiprocess test")
    run_training(cfg, mesh=mesh)
    model, tokenizer = forgetjax.load(os.path.join(cfg.train.out_dir, "final"), mesh=mesh)
    forgetjax.export_hf(model, tokenizer, spec["export_dir"])


class ScriptedRewards:
    """Deterministic verifier stand-in: reward = fraction of completion characters that are lowercase letters."""

    def submit_details(self, batch):
        from concurrent.futures import Future

        from forgetjax.verifiers.rewards import RewardDetail

        def reward(text):
            return sum(c.islower() for c in text) / max(len(text), 1)

        future = Future()
        future.set_result([RewardDetail(domain, reward(text), reward(text) > 0.5, True, None, "scripted", False)
                           for domain, text, _ in batch])
        return future


def grpo(spec, mesh):
    import numpy as np

    import forgetjax
    from forgetjax.config import from_dict
    from forgetjax.methods.registry import build_method
    from forgetjax.methods.rollout import OnlineSource
    from forgetjax.sampling.sampler import Sampler, SamplingParams
    from forgetjax.methods.run import RunConfig
    from forgetjax.training.trainer import Trainer

    pid = jax.process_index()
    cfg = from_dict(RunConfig, spec["run"], source="multiprocess test")
    model, tokenizer = forgetjax.load(cfg.train.model, mesh=mesh)
    sampler = Sampler(model, tokenizer, mesh=mesh)
    prompts = [sampler.encode_chat([{"role": "user", "content": text}]) for text in spec["sampler_prompts"]]
    out = sampler.generate_tokens(prompts, SamplingParams(max_new_tokens=12, temperature=1.0, n=2, seed=3))
    np.savez(os.path.join(spec["dump_dir"], f"sampler.p{pid}.npz"), tokens=out.tokens, logprobs=out.logprobs,
             lengths=out.lengths, finished=out.finished)
    original_next = OnlineSource.next_batch

    def next_batch(self, context):
        batch = original_next(self, context)
        np.savez(os.path.join(spec["dump_dir"], f"grpo.p{pid}.s{context.step}.npz"), **batch.arrays)
        with open(os.path.join(spec["dump_dir"], f"grpo.p{pid}.s{context.step}.json"), "w") as handle:
            json.dump({"info": batch.info, "tokens": batch.tokens, "examples": batch.examples,
                       "extra_flops": batch.extra_total}, handle)
        return batch

    OnlineSource.next_batch = next_batch
    method = build_method(cfg.method, cfg.method_args, cfg.domain)
    method.reward_pool = ScriptedRewards()
    Trainer(cfg.train, model, tokenizer, method, mesh=mesh).fit()


def main(spec_path: str, pid: int, nproc: int, port: int) -> None:
    with open(spec_path) as handle:
        spec = json.load(handle)
    if nproc > 1:
        jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=nproc, process_id=pid,
                                   coordinator_bind_address=f"127.0.0.1:{port}", initialization_timeout=120)
    audit = spec.get("audit")
    if audit and jax.process_index() == 1:
        install_write_audit(audit["root"], audit["log"])
    from forgetjax.sharding import make_mesh

    mesh = make_mesh(*spec["mesh"])
    {"train": train, "grpo": grpo}[spec["mode"]](spec, mesh)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
