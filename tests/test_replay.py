"""Replay (`train.replay`): the share of replay rows in every batch counted by decoding the rows (independent of the
source's bookkeeping), unpacked and packed; determinism under the seed and exact resume; the Trainer's replay usage
against a count of the batches it trained on; methods that cannot replay refused; a study resolving the named sources
to its replay records, with the replay in the cell id. Tiny random Llama with the byte-level ChatML tokenizer."""
from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml

import forgetjax
from forgetjax.errors import UserError
from forgetjax.methods.registry import build_method
from forgetjax.methods.run import DomainConfig
from forgetjax.sharding import make_mesh
from forgetjax.training.budget import BudgetConfig
from forgetjax.training.optim import OptimizerConfig
from forgetjax.training.replay import ReplayConfig
from forgetjax.training.trainer import CheckpointConfig, LogConfig, TrainConfig, Trainer
from tiny_models import make_tiny_chat_model

TASK = [{"prompt": f"Task question {i}?", "completion": f"task answer {i}" + " and more" * (i % 4)} for i in range(21)]
REPLAY = [{"prompt": f"Replay request {i}.", "completion": f"REPLAY reply {i}" + " ok" * (i % 3)} for i in range(9)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("replay")
    make_tiny_chat_model(root / "model")
    for name, rows in (("task", TASK), ("replay", REPLAY)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def trainer_for(root: Path, out: str, *, fraction: float | None, batch_size: int = 8, steps: int = 5,
                packing: bool = False, seed: int = 0, method: str = "gt_sft", budget=None):
    model, tokenizer = forgetjax.load(str(root / "model"))
    replay = ReplayConfig(str(root / "replay.jsonl"), fraction) if fraction is not None else None
    cfg = TrainConfig(batch_size=batch_size, max_length=128, budget=budget or BudgetConfig("steps", steps),
                      checkpoint=CheckpointConfig(every=100, keep=1), seed=seed, replay=replay,
                      log=LogConfig(progress=False, tensorboard=False, peak_flops=1e11),
                      optimizer=OptimizerConfig(lr=1e-3, schedule="constant"), out_dir=str(root / out))
    args = {"records": [str(root / "task.jsonl")], "verify": False, "packing": packing}
    if method != "gt_sft":
        args = {}
    built = build_method(method, args, DomainConfig(name="math"))
    return Trainer(cfg, model, tokenizer, built, mesh=make_mesh(1, 1, 1, devices=[jax.devices()[0]]))


def row_texts(tokenizer, arrays) -> list[list[str]]:
    """The decoded text of every segment of every row (empty list: a filler row)."""
    rows = []
    for ids, segments in zip(arrays["input_ids"], arrays["segment_ids"]):
        rows.append([tokenizer.decode(ids[segments == s]) for s in np.unique(segments[segments > 0])])
    return rows


def draw(trainer, n: int):
    source = trainer.method.batch_source(trainer)
    return source, [source.next_batch(None) for _ in range(n)]


@pytest.mark.parametrize("packing", [False, True])
def test_every_batch_holds_exactly_the_replay_share_of_rows(tiny, packing):
    trainer = trainer_for(tiny, f"count-{packing}", fraction=0.25, packing=packing)
    source, batches = draw(trainer, 7)  # past the end of the 9 replay records' first epoch
    replay_examples = 0
    for batch in batches:
        rows = row_texts(trainer.tokenizer, batch.arrays)
        is_replay = [bool(row) and all("REPLAY" in text for text in row) for row in rows]
        assert not any(any("REPLAY" in t for t in row) and not flag for row, flag in zip(rows, is_replay))
        assert sum(is_replay) == 2  # 0.25 x 8 rows, in every batch
        assert list(np.flatnonzero(batch.replay_rows)) == [i for i, flag in enumerate(is_replay) if flag]
        replay_examples += sum(len(row) for row, flag in zip(rows, is_replay) if flag)
        counted_tokens = int(batch.arrays["attention_mask"].sum())
        assert batch.tokens == counted_tokens
        assert batch.examples == sum(len(row) for row in rows)
    if not packing:
        assert replay_examples == 7 * 2
    use = source.replay_use()
    assert use.size == len(REPLAY) and use.consumed == replay_examples
    assert source.data_use().size == len(TASK)  # the method's data use leaves the replay records out


def test_replay_is_deterministic_under_the_seed_and_resumes_exactly(tiny):
    def replay_texts(trainer, n, state=None):
        source = trainer.method.batch_source(trainer)
        if state is not None:
            source.set_state(state)
        out = []
        for _ in range(n):
            batch = source.next_batch(None)
            rows = row_texts(trainer.tokenizer, batch.arrays)
            out.append([rows[i] for i in np.flatnonzero(batch.replay_rows)])
        return out, source.get_state()

    first, _ = replay_texts(trainer_for(tiny, "d0", fraction=0.25), 6)
    again, _ = replay_texts(trainer_for(tiny, "d1", fraction=0.25), 6)
    other, _ = replay_texts(trainer_for(tiny, "d2", fraction=0.25, seed=1), 6)
    assert first == again and first != other
    head, state = replay_texts(trainer_for(tiny, "d3", fraction=0.25), 3)
    assert set(state) == {"data", "charged", "prorated_share", "replay"}
    tail, _ = replay_texts(trainer_for(tiny, "d4", fraction=0.25), 3, state=json.loads(json.dumps(state)))
    assert head + tail == first


def test_the_trainer_counts_replay_tokens_in_the_budget_and_apart(tiny):
    trainer = trainer_for(tiny, "fit", fraction=0.5, batch_size=4, budget=BudgetConfig("tokens", 700))
    seen = []
    build = trainer.method.batch_source

    def recording_source(t):
        source = build(t)
        next_batch = source.next_batch

        def record(context):
            batch = next_batch(context)
            seen.append(batch)
            return batch

        source.next_batch = record
        return source

    trainer.method.batch_source = recording_source
    result = trainer.fit()
    used = result.usage
    assert used["tokens"] == 700  # the budget counts replay tokens; the last batch is cut to it
    # independent count: the trimmed batches' replay rows, found by their text (trimming cuts the last batch's
    # tokens in row-major order, so it is applied here by hand: the first `keep` real tokens)
    tokens = examples = drawn = 0
    total = 0
    for batch in seen:
        drawn += sum(len(row) for row, flag in zip(row_texts(trainer.tokenizer, batch.arrays), batch.replay_rows)
                     if flag)
        mask = batch.arrays["attention_mask"].astype(bool)
        keep = (np.cumsum(mask.reshape(-1)) + total <= 700).reshape(mask.shape) & mask
        total += int(keep.sum())
        for row, text in enumerate(row_texts(trainer.tokenizer, batch.arrays)):
            if text and all("REPLAY" in t for t in text):
                tokens += int(keep[row].sum())
                examples += len(np.unique(batch.arrays["segment_ids"][row][keep[row]]))
    assert used["replay_tokens"] == tokens > 0 and used["replay_examples"] == examples
    assert 0 < used["replay_tokens"] < used["tokens"]
    assert result.replay == {"size": len(REPLAY), "unique": min(drawn, len(REPLAY)),
                             "epochs": pytest.approx(drawn / len(REPLAY))}
    saved = json.loads((tiny / "fit" / "train_result.json").read_text())
    assert saved["usage"]["replay_tokens"] == tokens and saved["replay"] == result.replay


def test_a_fraction_that_is_not_a_whole_number_of_rows_is_refused_at_load():
    from forgetjax.config import ConfigError, from_dict

    with pytest.raises(ConfigError, match=r"replay: replay fraction 0.3 x batch_size 8 = 2.4 rows"):
        from_dict(TrainConfig, {"batch_size": 8, "replay": {"source": "x.jsonl", "fraction": 0.3}}, source="run.yaml")
    with pytest.raises(ConfigError, match=r"replay: fraction must be in \(0, 1\)"):
        from_dict(TrainConfig, {"batch_size": 8, "replay": {"source": "x.jsonl", "fraction": 1.0}}, source="run.yaml")


def test_a_method_that_cannot_replay_is_refused(tiny):
    with pytest.raises(UserError, match="train.replay: method off_rl_dpo cannot replay"):
        trainer_for(tiny, "dpo", fraction=0.25, method="off_rl_dpo")


def test_a_study_resolves_named_sources_to_its_replay_records_and_the_replay_is_in_the_cell_id(tmp_path, data_dir):
    from forgetjax.study.matrix import expand
    from forgetjax.study.runner import StudyRunner
    from forgetjax.study.safety import harmful_records
    from forgetjax.study.schema import load_study_config

    battery = tmp_path / "battery.yaml"
    battery.write_text(yaml.safe_dump({"name": "b", "format": "chat", "benchmarks": [{"name": "mmlu", "limit": 2}]}))
    study = {"models": [{"scale": "tiny", "safe": "some/model"}], "scales": ["tiny"], "start_points": ["safe"],
             "methods": ["gt_sft"], "domains": ["math"], "battery": str(battery), "data_dir": str(data_dir),
             "results_dir": str(tmp_path / "results"), "train": {"batch_size": 4},
             "safety_stage": {"harmful_limit": 5}}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))

    def gt_cell(*overrides):
        return next(c for c in expand(load_study_config(path, list(overrides))) if c.method == "gt_sft")

    plain = gt_cell()
    safety = gt_cell("train.replay={source: safety, fraction: 0.25}")
    half = gt_cell("train.replay={source: safety, fraction: 0.5}")
    general = gt_cell("train.replay={source: general, fraction: 0.25}")
    assert len({plain.cell_id, safety.cell_id, half.cell_id, general.cell_id}) == 4
    records = Path(safety.run["train"]["replay"]["source"])
    assert records == tmp_path / "results" / "stages" / safety.replay_stage / "replay_records.jsonl"
    assert safety.resolved["run"]["train"]["replay"] == {"source": str(records), "fraction": 0.25}
    assert general.replay_stage != safety.replay_stage and plain.replay_stage is None

    cfg = load_study_config(path, ["train.replay={source: safety, fraction: 0.25}"])
    StudyRunner(cfg, log=lambda _: None).run_replay_stage(safety.replay_stage)
    rows = [json.loads(line) for line in records.read_text().splitlines()]
    assert rows == harmful_records(data_dir)[:5] and {r["kind"] for r in rows} == {"refusal"}
    with pytest.raises(UserError, match="train.replay: method off_rl_dpo cannot replay"):
        load_study_config(path, ["methods=[off_rl_dpo]", "train.replay={source: safety, fraction: 0.25}"])
