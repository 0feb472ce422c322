"""How a request is decoded: its sampling settings, the next token from the logits, and each token's record."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..core.checks import positive_int_problem
from .errors import SamplingFieldError


@dataclass
class SamplingParams:
    """How one request is decoded. max_new_tokens None: as many as the context and the token budget leave, at most
    OPEN_ENDED_TOKENS. temperature 0 is greedy; seed makes sampling reproducible whatever else is in the batch
    (each request draws from its own generator); stop: strings that end the text (not included)."""

    max_new_tokens: int | None = 64
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # record each sampled token's log-probability and the `logprobs` most likely
    # decode max_new_tokens whatever the model samples: its end-of-text tokens are kept as tokens (vLLM's
    # `ignore_eos`, what serving benchmarks send to time a fixed number of tokens); stop strings still end the text
    ignore_eos: bool = False

    def problems(self) -> list[SamplingFieldError]:
        """Every problem at once, each naming the field (`param`), the value and what is allowed."""
        out = []

        def bad(field: str, message: str) -> None:
            out.append(SamplingFieldError(message, field))

        n = self.max_new_tokens
        if n is not None and (problem := positive_int_problem("max_new_tokens", n)):
            bad("max_new_tokens", problem)
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t <= 100 or t != t:
            bad("temperature", f"temperature must be a number in [0, 100] (0: greedy), got {t!r}")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
            bad("top_p", f"top_p must be a number in (0, 1], got {p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            bad("seed", f"seed must be an integer, got {self.seed!r}")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            bad("stop", f"stop must be a list of non-empty strings, got {self.stop!r}")
        elif len(self.stop) > 16:
            bad("stop", f"stop takes at most 16 strings, got {len(self.stop)}")
        lp = self.logprobs
        if lp is not None and (problem := positive_int_problem("logprobs", lp, 0, MAX_LOGPROBS)):
            bad("logprobs", problem)
        if not isinstance(self.ignore_eos, bool):
            bad("ignore_eos", f"ignore_eos must be true or false, got {self.ignore_eos!r:.40}")
        return out

    def errors(self) -> list[str]:
        """`problems()` as messages."""
        return [str(p) for p in self.problems()]


MAX_LOGPROBS = 20  # the most alternatives a sampled token's record lists (`SamplingParams.logprobs`)


OPEN_ENDED_TOKENS = 256  # the most tokens a request without max_new_tokens gets


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """The next token from logits Tensor[V]: argmax at temperature 0, else nucleus sampling (top_p) from the
    softmax at `temperature`, drawn with the request's own generator."""
    if params.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < params.top_p  # the smallest set whose mass reaches top_p
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


def token_logprobs(logits: torch.Tensor, token: int, top: int) -> tuple[int, float, list[tuple[int, float]]]:
    """(token, its log-probability, the `top` most likely (id, log-probability)) from logits Tensor[V]: the
    model's own distribution (log_softmax in fp32), whatever temperature or top_p sampled from it."""
    lp = torch.log_softmax(logits.float(), -1)
    best = lp.topk(min(top, lp.numel())) if top else None
    alts = list(zip(best.indices.tolist(), best.values.tolist())) if best is not None else []
    return token, float(lp[token]), alts


__all__ = ["MAX_LOGPROBS", "OPEN_ENDED_TOKENS", "SamplingParams", "sample", "token_logprobs"]
