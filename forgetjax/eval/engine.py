"""The abstract model interface the evaluation code is written against.

The battery runner never touches a model directly: it sends `GenerationRequest`s and (context, continuation)
pairs to an `Engine`, in the spirit of lm-eval's `generate_until` / `loglikelihood` interface. A concrete JAX
sampler implements this protocol later; tests use a scripted fake.

Contract for implementers:
- `generate` returns exactly one `Generation` per request, in order, each with `n` texts. Texts are cut at the
  first stop string (the stop string itself removed). A request whose prompt is a list of chat messages must be
  rendered with `apply_chat_template(messages)` (the runner hashes that exact text as the prompt).
- `loglikelihood` returns one `LoglikelihoodResult` per (context, continuation) pair: the summed log-probability
  of the continuation tokens given the context, their count, and whether greedy decoding would produce them.
- `apply_chat_template(messages)` renders the messages with the generation prompt appended (the assistant turn
  is open), as `tokenizer.apply_chat_template(..., add_generation_prompt=True, tokenize=False)` does.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence, Union, runtime_checkable

ChatMessage = dict[str, str]
Prompt = Union[str, list[ChatMessage]]


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt to sample from: plain text (base models) or chat messages (instruct models)."""

    prompt: Prompt
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    n: int = 1
    stop: tuple[str, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, (str, list)):
            raise TypeError(f"GenerationRequest.prompt must be str or list of messages, got {type(self.prompt)}")
        if isinstance(self.prompt, list):
            for message in self.prompt:
                if not isinstance(message, dict) or "role" not in message or "content" not in message:
                    raise ValueError(f"GenerationRequest.prompt: each message needs 'role' and 'content': {message!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"GenerationRequest.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"GenerationRequest.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"GenerationRequest.top_p must be in (0, 1], got {self.top_p}")
        if self.n < 1:
            raise ValueError(f"GenerationRequest.n must be >= 1, got {self.n}")


@dataclass(frozen=True)
class Generation:
    """The n sampled continuations of one request and their lengths in tokens."""

    texts: list[str]
    output_tokens: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.output_tokens and len(self.output_tokens) != len(self.texts):
            raise ValueError(
                f"Generation.output_tokens has {len(self.output_tokens)} entries for {len(self.texts)} texts"
            )


@dataclass(frozen=True)
class LoglikelihoodResult:
    """Summed log-probability of a continuation given its context (lm-eval's loglikelihood output)."""

    logprob: float
    n_tokens: int
    is_greedy: bool


@runtime_checkable
class Engine(Protocol):
    """What the evaluation battery needs from a model."""

    model_id: str

    def generate(self, requests: list[GenerationRequest]) -> list[Generation]:
        """Sample continuations, one Generation per request, in order."""
        ...

    def loglikelihood(self, requests: list[tuple[str, str]]) -> list[LoglikelihoodResult]:
        """Score (context, continuation) pairs, one result per pair, in order."""
        ...

    def apply_chat_template(self, messages: Sequence[ChatMessage]) -> str:
        """Render chat messages to the exact prompt text, assistant turn opened."""
        ...
