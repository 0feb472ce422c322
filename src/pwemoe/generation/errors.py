"""Typed refusals of the generation engine: what is wrong with a request, the field at fault, and its error code.

The engine (`generation.Scheduler`, `logprobs.PromptScorer`, `generation.SamplingParams`) checks a request before it
queues anything and reports every problem at once as one `RequestRefused` holding one `GenerationError` per
problem. Edges map them by type, never by message text: the OpenAI routes turn a `PromptTooLong` into a 400 with
`param: "prompt"` (or `"messages"`) and `code: "context_length_exceeded"`, a `SamplingFieldError` into a 400 naming
its field, and so on (`serve.openai_common.submit_error`). All are ValueErrors, so Python callers that catch
ValueError keep working.
"""

from __future__ import annotations

from collections.abc import Sequence


class GenerationError(ValueError):
    """One problem with a request. `param`: the request field at fault (engine names: "prompt", "max_new_tokens",
    "temperature", ...); `code`: the OpenAI error code, if one applies."""

    param: str = "prompt"
    code: str | None = None

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        if param is not None:
            self.param = param

    def prefixed(self, prefix: str) -> GenerationError:
        """The same problem, its message prefixed (e.g. "prompt 2: ..." for one prompt of several)."""
        return type(self)(f"{prefix}{self}", self.param)


class SamplingFieldError(GenerationError):
    """A sampling field out of range (`param` names it: max_new_tokens, temperature, top_p, seed, stop, logprobs)."""


class EmptyPrompt(GenerationError):
    """A prompt with no tokens."""


class BadTokens(GenerationError):
    """Token ids outside the vocabulary."""


class PromptTooLong(GenerationError):
    """A prompt that alone fills the model's context."""

    code = "context_length_exceeded"


class ContextExceeded(GenerationError):
    """A prompt that fits, but not with the tokens asked for: max_new_tokens is at fault."""

    param = "max_new_tokens"
    code = "context_length_exceeded"


class BudgetExceeded(GenerationError):
    """A request larger than the server's token budget (prompt + max_new_tokens)."""

    param = "max_new_tokens"


class RequestRefused(ValueError):
    """A refused request: every problem found, in order (`problems`); the message joins them."""

    def __init__(self, problems: Sequence[GenerationError]) -> None:
        if not problems:
            raise ValueError("RequestRefused needs at least one problem")
        super().__init__("; ".join(str(p) for p in problems))
        self.problems = list(problems)

    @property
    def first(self) -> GenerationError:
        """The problem an API edge reports the request by (its field and code)."""
        return self.problems[0]


__all__ = [
    "BadTokens",
    "BudgetExceeded",
    "ContextExceeded",
    "EmptyPrompt",
    "GenerationError",
    "PromptTooLong",
    "RequestRefused",
    "SamplingFieldError",
]
