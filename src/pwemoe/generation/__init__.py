"""Generation at any preference, per request: a batch of sequences, each with its own preference, decoded together.

The upcycled causal LM runs every row of a batch at that row's own preference (`routing.set_row_preferences`):
for LoRA experts (and `task_vector_rank`) the preference only scales the rank columns of thin matmuls, so rows
with different preferences share one forward and no merge happens at all; dense experts merge once per distinct
preference (cached) and group rows at each linear layer.

`BatchDecoder` holds the running batch and its KV cache (transformers' `DynamicCache`, left-padded): sequences join
at any decode step (their prompts are prefilled together, then their cache is padded on the left to the batch's
length and concatenated) and leave when they finish (their rows are dropped from the cache). `Scheduler` runs it
in a thread (continuous batching): a new request joins the running batch at the next step, a finished or
cancelled one leaves it, bounded by `max_batch` sequences and a budget of tokens in flight.

When every row of a decode step has one preference (a lone request, or clients that agree), the step can run
on a plain merged copy of the backbone instead (`BatchDecoder(merged=...)`, the server's cache of merged copies):
the same theta(r) and the same KV cache, without the per-row work of the upcycled modules.

The rows' preferences are made into one table per batch composition (`routing.row_preferences_table`): each request's
preference goes through the routers once, when it joins, and each LoRA layer keeps its per-row column scales until
rows join or leave. In bf16 and fp16 the forwards run on a serving copy of the frozen weights in that dtype
(`weights.ServingWeights`, and the factored layers' fused copies), cast once instead of by autocast at every step.

The package, one job per module: `sampling` (SamplingParams, sample, token_logprobs), `requests` (Request, Handle),
`decoder` (BatchDecoder), `scheduler` (Scheduler), `prompts` (check_messages, prompt_ids), `weights`
(ServingWeights) and `errors` (the typed refusals: RequestRefused holding each GenerationError).
"""

from .decoder import BatchDecoder, context_length
from .decoder import _cast_head as _cast_head  # for the benchmarks and tests that reach inside
from .decoder import _one_preference as _one_preference
from .errors import GenerationError, RequestRefused
from .prompts import ROLES, check_messages, prompt_ids
from .requests import Handle, Request
from .sampling import MAX_LOGPROBS, OPEN_ENDED_TOKENS, SamplingParams, sample, token_logprobs
from .scheduler import Scheduler

__all__ = [
    "MAX_LOGPROBS",
    "OPEN_ENDED_TOKENS",
    "ROLES",
    "BatchDecoder",
    "GenerationError",
    "Handle",
    "Request",
    "RequestRefused",
    "SamplingParams",
    "Scheduler",
    "check_messages",
    "context_length",
    "prompt_ids",
    "sample",
    "token_logprobs",
]
