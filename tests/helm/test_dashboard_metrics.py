"""The Grafana dashboard queries only metrics raylane really exports, with labels they really carry, and shows them all.

"Really exports" is the exposition the production metrics objects write (tests/helm/exported_metrics.py), so a
renamed metric or label in router/metrics.py, router/worker_metrics.py or control_plane/metrics.py fails here.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
from exported_metrics import CHART_RELABELLED, SCRAPE_LABELS, exposition
from helm_support import CHART, RELEASE
from promql_names import Query, analyze

DASHBOARD = CHART / "files" / "grafana-dashboard.json"
FILTER_VARIABLES = ("deployment", "pool", "tenant")
"""Template variables every raylane panel applies where its metric has the label."""
_LABEL_VALUES = re.compile(r"label_values\((?P<selector>.+),\s*(?P<label>[A-Za-z_][A-Za-z0-9_]*)\s*\)")
_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


def board() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panel_queries() -> Iterator[tuple[str, dict[str, Any], Query]]:
    """(panel title, target, analysis) of every query of every panel."""
    for panel in board()["panels"]:
        for target in panel.get("targets", []):
            yield panel["title"], target, analyze(target["expr"])


def variable_queries() -> Iterator[tuple[str, Query, str]]:
    """(variable name, analysis of its selector, the label it lists) of every `label_values` template variable."""
    for variable in board()["templating"]["list"]:
        if variable["type"] != "query":
            continue
        match = _LABEL_VALUES.fullmatch(variable["query"].strip())
        assert match, f"variable {variable['name']}: only label_values(selector, label) is modelled"
        yield variable["name"], analyze(match["selector"]), match["label"]


def _label_errors(where: str, query: Query) -> list[str]:
    """Every raylane name in `query` that nothing exports, and every label it uses that its metric lacks."""
    samples, errors = exposition().samples, []
    for selector in query.selectors:
        if not selector.name.startswith("raylane_"):
            continue  # Ray's own (ray_*): exported by Ray, not by raylane's code
        if selector.name not in samples:
            near = difflib.get_close_matches(selector.name, samples, n=3)
            errors.append(f"{where}: {selector.name} is not exported (closest exported names: {near})")
            continue
        for label in set(selector.labels) - samples[selector.name] - SCRAPE_LABELS:
            errors.append(f"{where}: {selector.name} has no label {label!r} (it has {sorted(samples[selector.name])})")
    for grouping in query.groupings:
        for name in grouping.metrics:
            if name.startswith("raylane_") and name in samples:
                for label in set(grouping.labels) - samples[name] - SCRAPE_LABELS:
                    errors.append(f"{where}: by ({', '.join(grouping.labels)}) over {name}, which has no {label!r}")
    return errors


def test_the_dashboard_queries_raylanes_metrics_not_only_rays():
    names = {s.name for _, _, query in panel_queries() for s in query.selectors}
    assert len({n for n in names if n.startswith("raylane_")}) >= 20, sorted(names)
    assert {n for n in names if n.startswith("ray_")}, "Ray's own panels are kept"
    # The exposition really writes the suffixes dashboards query (a bare family name never matches a series).
    samples = exposition().samples
    for name in ("raylane_requests_total", "raylane_time_to_first_token_seconds_bucket", "raylane_migrations_total"):
        assert name in samples
    assert "le" in samples["raylane_time_to_first_token_seconds_bucket"]
    assert "raylane_requests" not in samples and "raylane_time_to_first_token_seconds" not in samples


def test_every_raylane_name_the_panels_query_is_exported_with_the_labels_they_use():
    errors = [e for title, _, query in panel_queries() for e in _label_errors(f"panel {title!r}", query)]
    assert not errors, "\n".join(errors)


def test_template_variables_list_labels_of_exported_metrics():
    samples, seen = exposition().samples, set()
    for name, query, label in variable_queries():
        errors = _label_errors(f"variable {name}", query)
        assert not errors, "\n".join(errors)
        (selector,) = query.selectors
        if selector.name.startswith("raylane_"):
            assert label in samples[selector.name], f"variable {name}: {selector.name} has no label {label!r}"
            seen.add(name)
    assert set(FILTER_VARIABLES) <= seen


def test_raylane_panels_honour_the_deployment_pool_and_tenant_variables():
    samples, errors = exposition().samples, []
    for title, target, query in panel_queries():
        for selector in query.selectors:
            labels = samples.get(selector.name, frozenset()) if selector.name.startswith("raylane_") else frozenset()
            missing = [v for v in FILTER_VARIABLES if v in labels and f'{v}=~"${v}"' not in target["expr"]]
            errors += [f"panel {title!r}: {selector.name} is not filtered by ${v}" for v in missing]
    assert not errors, "\n".join(errors)


def test_every_exported_raylane_metric_is_on_the_dashboard():
    families = exposition().families
    queried = {s.name for _, _, query in panel_queries() for s in query.selectors}
    # The text format writes a counter's or histogram's `_created` timestamps as a family of their own.
    shown = {name for name in families if not (name.endswith("_created") and name.removesuffix("_created") in families)}
    missing = [name for name in shown if not set(families[name]) & queried]
    assert not missing, f"exported but on no panel: {missing}"
    assert all(families[name] for name in shown), "exported_metrics.py feeds every family (one sample at least)"


def test_legends_name_labels_the_query_keeps():
    errors = []
    for title, target, query in panel_queries():
        placeholders = set(_PLACEHOLDER.findall(target.get("legendFormat", "")))
        if query.groupings:
            kept = set(query.groupings[0].labels) - {"le"}  # the outermost aggregation (prefix form) comes first
            errors += [
                f"panel {title!r}: legend {{{{{p}}}}} not in by ({', '.join(kept)})" for p in placeholders - kept
            ]
    assert not errors, "\n".join(errors)


def test_no_raylane_label_collides_with_a_label_prometheus_adds():
    for name, labels in exposition().samples.items():
        assert not labels & SCRAPE_LABELS, f"{name}: {sorted(labels & SCRAPE_LABELS)} would become exported_*"


@pytest.mark.parametrize(
    ("expr", "error"),
    [
        ('sum by (status) (rate(raylane_request_total{namespace="x"}[5m]))', "raylane_request_total is not exported"),
        ("sum by (tenant) (rate(raylane_time_to_first_token_seconds_bucket[5m]))", "which has no 'tenant'"),
        ('rate(raylane_requests_total{finish_reason="stop"}[5m])', "has no label 'finish_reason'"),
        ("raylane_time_to_first_token_seconds", "raylane_time_to_first_token_seconds is not exported"),
    ],
)
def test_the_check_catches_a_wrong_name_or_label(expr, error):
    """The checks above are not vacuous: a typo in a name, a suffix or a label is reported."""
    assert any(error in e for e in _label_errors("probe", analyze(expr)))


def test_the_chart_ships_this_dashboard_and_its_scrapes_add_only_the_labels_allowed_for(render):
    objects = render(None, "metrics.serviceMonitor.enabled=true")
    (configmap,) = [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-dashboard")]
    assert configmap["metadata"]["name"] == f"{RELEASE}-raylane-dashboard"
    assert json.loads(configmap["data"]["raylane.json"]) == board()
    (monitor,) = [o for o in objects if o["kind"] == "ServiceMonitor"]
    added = {r["targetLabel"] for e in monitor["spec"]["endpoints"] for r in e.get("relabelings", [])}
    assert added == CHART_RELABELLED
