"""What a PromQL expression reads: the metric selectors with their matcher labels, and each `by (...)` list with the
metrics it groups. Enough of PromQL for the chart's dashboard; a construct it does not model is an error, so a new
query cannot slip past the dashboard tests unchecked.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_TOKEN = re.compile(
    r"""\s*(?:
      (?P<string>"(?:[^"\\]|\\.)*")
    | (?P<range>\[[^\]]*\])
    | (?P<number>[0-9]+(?:\.[0-9]+)?(?:e[+-]?[0-9]+)?)
    | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
    | (?P<op>=~|!~|!=|==|>=|<=|[-+*/%^<>=,(){}])
    )""",
    re.VERBOSE,
)
AGGREGATIONS = {"sum", "avg", "min", "max", "count", "stddev", "stdvar", "group", "topk", "bottomk", "quantile"}
"""Aggregation operators: `by` follows or precedes their argument."""
UNMODELLED = {"without", "on", "ignoring", "group_left", "group_right", "offset"}
"""Grouping and vector-matching modifiers this module does not follow (the labels they name go unchecked)."""
KEYWORDS = {"by", "bool", "and", "or", "unless"} | UNMODELLED
_MATCH_OPS = {"=", "!=", "=~", "!~"}


@dataclass(frozen=True)
class Selector:
    """One instant- or range-vector selector, `name{label="..."}`."""

    name: str
    """The metric name (a sample name of the exposition format: `x_total`, `x_bucket`, ...)."""
    labels: tuple[str, ...]
    """Labels its matchers name."""


@dataclass(frozen=True)
class Grouping:
    """A `by (...)` of an aggregation and what it aggregates."""

    labels: tuple[str, ...]
    """The labels the aggregation keeps."""
    metrics: tuple[str, ...]
    """Names of the selectors inside the aggregated expression (their series must carry `labels`)."""


@dataclass(frozen=True)
class Query:
    """What one expression reads."""

    selectors: tuple[Selector, ...]
    groupings: tuple[Grouping, ...]


def tokenize(expr: str) -> list[tuple[str, str]]:
    """(kind, text) pairs; raises ValueError at a character PromQL does not allow."""
    tokens, pos = [], 0
    expr = expr.rstrip()
    while pos < len(expr):
        match = _TOKEN.match(expr, pos)
        if match is None:
            raise ValueError(f"cannot tokenize {expr[pos:]!r} in {expr!r}")
        kind = match.lastgroup
        assert kind is not None
        tokens.append((kind, match.group(kind)))
        pos = match.end()
    return tokens


def analyze(expr: str) -> Query:
    """The selectors and groupings of `expr`; raises ValueError on unbalanced brackets or an unmodelled construct."""
    tokens = tokenize(expr)
    closing = _matching_brackets(tokens, expr)
    for kind, text in tokens:
        if kind == "ident" and text in UNMODELLED:
            raise ValueError(
                f"{text!r} in {expr!r}: the dashboard tests do not model it; teach tests/helm/promql_names.py"
            )
    label_lists = {}  # index of a `by` -> (end of its label list, labels)
    for i, (kind, text) in enumerate(tokens):
        if kind == "ident" and text == "by":
            if i + 1 >= len(tokens) or tokens[i + 1][1] != "(":
                raise ValueError(f"`by` without a label list in {expr!r}")
            end = closing[i + 1]
            label_lists[i] = (end, tuple(t for k, t in tokens[i + 2 : end] if k == "ident"))
    skip = {j for i, (end, _) in label_lists.items() for j in range(i, end + 1)}
    selectors = _selectors(tokens, closing, skip)
    groupings = []
    for i, (end, labels) in label_lists.items():
        span = _aggregated_span(tokens, closing, i, end, expr)
        metrics = tuple(s.name for start, s in selectors if span[0] < start < span[1])
        groupings.append(Grouping(labels=labels, metrics=metrics))
    return Query(selectors=tuple(s for _, s in selectors), groupings=tuple(groupings))


def _matching_brackets(tokens: list[tuple[str, str]], expr: str) -> dict[int, int]:
    pairs, stack = {}, []
    for i, (kind, text) in enumerate(tokens):
        if kind == "op" and text in "({":
            stack.append(i)
        elif kind == "op" and text in ")}":
            if not stack or tokens[stack[-1]][1] != {")": "(", "}": "{"}[text]:
                raise ValueError(f"unbalanced {text!r} in {expr!r}")
            opening = stack.pop()
            pairs[opening], pairs[i] = i, opening
    if stack:
        raise ValueError(f"unclosed {tokens[stack[-1]][1]!r} in {expr!r}")
    return pairs


def _selectors(tokens: list[tuple[str, str]], closing: dict[int, int], skip: set[int]) -> list[tuple[int, Selector]]:
    """(token index, selector) of every metric name outside label matchers and `by` lists."""
    selectors, i = [], 0
    while i < len(tokens):
        kind, text = tokens[i]
        if kind == "op" and text == "{":  # a matcher block without a name before it (`{__name__=...}`)
            i = closing[i] + 1
            continue
        following = tokens[i + 1][1] if i + 1 < len(tokens) else ""
        is_call = following == "(" or (text in AGGREGATIONS and following == "by")
        if kind != "ident" or i in skip or text in KEYWORDS or is_call:
            i += 1
            continue
        labels: tuple[str, ...] = ()
        if i + 1 < len(tokens) and tokens[i + 1][1] == "{":
            end = closing[i + 1]
            inner = tokens[i + 2 : end]
            labels = tuple(
                t
                for j, (k, t) in enumerate(inner)
                if k == "ident" and j + 1 < len(inner) and inner[j + 1][1] in _MATCH_OPS
            )
            selectors.append((i, Selector(name=text, labels=labels)))
            i = end + 1
            continue
        selectors.append((i, Selector(name=text, labels=labels)))
        i += 1
    return selectors


def _aggregated_span(
    tokens: list[tuple[str, str]], closing: dict[int, int], by: int, end: int, expr: str
) -> tuple[int, int]:
    """The (open, close) token indices of the parentheses around what the aggregation at `by` aggregates."""
    before = tokens[by - 1] if by > 0 else ("", "")
    if before[0] == "ident" and before[1] in AGGREGATIONS:  # sum by (x) (expr)
        if end + 1 >= len(tokens) or tokens[end + 1][1] != "(":
            raise ValueError(f"aggregation without an argument in {expr!r}")
        return end + 1, closing[end + 1]
    if before[1] == ")":  # sum (expr) by (x)
        opening = closing[by - 1]
        if opening == 0 or tokens[opening - 1][1] not in AGGREGATIONS:
            raise ValueError(f"`by` after something that is not an aggregation in {expr!r}")
        return opening, by - 1
    raise ValueError(f"`by` not attached to an aggregation in {expr!r}")
