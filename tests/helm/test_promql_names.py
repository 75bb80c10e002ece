"""The small PromQL reader the dashboard tests rely on: what it finds, and what it refuses to guess about."""

from __future__ import annotations

import pytest
from promql_names import Grouping, Selector, analyze


def test_selectors_keep_their_matcher_labels_and_skip_functions_and_by_lists():
    query = analyze('histogram_quantile(0.99, sum by (le, step) (rate(x_bucket{pod=~"a-.*", step!="b"}[5m])))')
    assert query.selectors == (Selector(name="x_bucket", labels=("pod", "step")),)
    assert query.groupings == (Grouping(labels=("le", "step"), metrics=("x_bucket",)),)


def test_nested_and_postfix_groupings_cover_the_selectors_inside_them():
    query = analyze("sum by (d) (max by (d, w) (a)) / sum(rate(b[1m])) by (d)")
    assert [s.name for s in query.selectors] == ["a", "b"]
    assert query.groupings == (
        Grouping(labels=("d",), metrics=("a",)),
        Grouping(labels=("d", "w"), metrics=("a",)),
        Grouping(labels=("d",), metrics=("b",)),
    )


@pytest.mark.parametrize(
    ("expr", "error"),
    [
        ("sum without (a) (x)", "'without'"),
        ("a / on (d) b", "'on'"),
        ("sum by (a) (x", "unclosed"),
        ("x by (a)", "not attached to an aggregation"),
        ("rate(x[5m]) by (a)", "not an aggregation"),
        ("x # y", "cannot tokenize"),
    ],
)
def test_what_it_does_not_model_is_an_error_not_a_pass(expr, error):
    with pytest.raises(ValueError, match=error):
        analyze(expr)
