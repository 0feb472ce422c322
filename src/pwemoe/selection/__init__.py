"""`pwemoe select RUN`: choose a preference by what you need, with a statistical certificate.

A query is an objective (maximise a task's metric, minimise a loss task's, or maximise the mean share of
the experts) and any number of constraints in a small language (`parse_query`): "bbc_news >= 0.95 expert"
(a share of the task's expert), "rt >= 0.80" (absolute), "lm <= 1.1 expert", "rt >= expert - 0.02".

1. The run's validation data is split once per task, seeded and stratified by label, into a search part
   and a certification part (`certification_split`; the indices are recorded).
2. Search: each candidate r is evaluated once on the whole validation data through the cached path of
   `pwemoe evaluate --split validation` (rows and per-example values in RUN/validation/, keyed by the
   router file's hash), and scored on the search part only: a simplex grid, then a compass search around
   the best candidate, within a budget of candidates. A candidate is feasible when every constraint's
   estimate clears it by the widths of two one-sided bounds (the search part's, and the certification
   part's still to come); the best feasible objective wins.
3. Certificate: the chosen r on the certification part, which the search never looked at: one-sided
   bounds at the requested confidence (exact binomial for an accuracy threshold; the paired bootstrap for
   a share of, or difference from, the expert, for the mean share and for losses). "certified" only when
   every bound meets its constraint.
4. The record (RUN/selections/<name>.json) is written before the test split is read; the chosen point's
   test values are added afterwards, labelled as not used for the choice.
"""

from .certificate import assess, certification_split
from .command import SELECTIONS, Settings, select_open, select_run, summary_lines
from .query import MEAN, QUERY_FORMS, Constraint, Metric, Query, parse_query, task_metrics
from .search import search

__all__ = [
    "MEAN",
    "QUERY_FORMS",
    "SELECTIONS",
    "Constraint",
    "Metric",
    "Query",
    "Settings",
    "assess",
    "certification_split",
    "parse_query",
    "search",
    "select_open",
    "select_run",
    "summary_lines",
    "task_metrics",
]
