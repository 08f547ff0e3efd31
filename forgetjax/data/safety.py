"""Safety-tuning records that turn a non-refusing instruct model into a SAFE start point.

Harmful requests come from Do-Not-Answer (kept apart from the safety evaluation sets: AdvBench, HarmBench,
StrongREJECT, XSTest) and get one of several refusal phrasings; helpful requests (GSM8K train, EfficientQA) keep
their reference answers, so the stage teaches refusing harmful requests without refusing everything.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

REFUSALS = (
    "I'm sorry, but I can't help with that. It could cause real harm.",
    "I can't assist with this request because it could be used to hurt people.",
    "I'm not able to help with that. If you have another question, I'm happy to help.",
    "Sorry, I won't provide that. It could be dangerous or harmful to others.",
    "I cannot help with this request, as it may lead to harm.",
    "I must decline this request; providing that information could cause harm.",
)


def _pick(text: str, options: tuple[str, ...]) -> str:
    digest = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)
    return options[digest % len(options)]


def _clean_gsm8k(answer: str) -> str:
    body, _, final = answer.rpartition("####")
    body = re.sub(r"<<[^>]*>>", "", body).strip()
    return f"{body}\nThe answer is {final.strip()}."


def _jsonl(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def safety_records(data_dir: str | Path, harmful_limit: int = 256, helpful_limit: int = 256) -> list[dict]:
    """[{"prompt", "completion", "kind"}] with harmful and helpful examples interleaved deterministically."""
    data_dir = Path(data_dir)
    harmful_files = sorted((data_dir / "do_not_answer").glob("*.jsonl"))
    if not harmful_files:
        raise FileNotFoundError(f"{data_dir / 'do_not_answer'}: no Do-Not-Answer files for the safety stage")
    harmful = []
    for path in harmful_files:
        for row in _jsonl(path):
            prompt = str(row.get("prompt", "")).strip()
            if prompt:
                harmful.append({"prompt": prompt, "completion": _pick(prompt, REFUSALS), "kind": "refusal"})
    harmful.sort(key=lambda r: hashlib.sha256(r["prompt"].encode()).hexdigest())
    helpful = [{"prompt": r["question"], "completion": _clean_gsm8k(r["answer"]), "kind": "helpful"}
               for r in _jsonl(data_dir / "gsm8k" / "train.jsonl")[: helpful_limit // 2]]
    qa_path = data_dir / "nq_open" / "NQ-open.efficientqa.dev.1.1.jsonl"
    if qa_path.is_file():
        helpful += [{"prompt": r["question"].strip().capitalize() + "?",
                     "completion": f"{str(r['answer'][0]).strip().capitalize()}.", "kind": "helpful"}
                    for r in _jsonl(qa_path)[: helpful_limit - len(helpful)]]
    harmful = harmful[:harmful_limit]
    mixed = []
    for i in range(max(len(harmful), len(helpful))):
        mixed.extend(r[i] for r in (harmful, helpful) if i < len(r))
    return mixed
