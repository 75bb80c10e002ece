"""Write `router.config` of helm/raylane/values.schema.json from `RouterConfig` (router/config.py).

Run after changing any router config in the tree: `python ci/router_schema.py`; tests/helm/test_chart_router_config.py
fails while the chart's schema and the dataclasses disagree.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "helm" / "raylane" / "values.schema.json"
CHART_OWNED = frozenset({"host", "port", "http_port", "metrics_port", "tls_cert_file", "tls_key_file"})
"""RouterConfig keys the chart renders from its own values (router.port, router.http, router.metricsPort, tls)."""


def router_config_schema() -> dict[str, Any]:
    sys.path.insert(0, str(ROOT))
    from router.config import RouterConfig
    from router.config_tree import json_schema

    schema = json_schema(RouterConfig, exclude=CHART_OWNED)
    schema["description"] = (
        "RouterConfig settings (router/config.py) for every router, rendered into the cluster ConfigMap's router "
        "section; the chart sets host, ports and TLS itself"
    )
    return schema


def main() -> None:
    values = json.loads(SCHEMA.read_text())
    values["properties"]["router"]["properties"]["config"] = router_config_schema()
    SCHEMA.write_text(json.dumps(values, indent=2) + "\n")


if __name__ == "__main__":
    main()
