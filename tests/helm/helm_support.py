"""Where the chart and helm are, and how the chart tests call helm (shared by conftest.py and the tests)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "raylane"
EXAMPLES = CHART / "examples"
RELEASE = "rl"
NAMESPACE = "llm"


def find_helm() -> str | None:
    """$RAYLANE_HELM, then PATH, then where ci/install_helm.sh puts it."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "raylane" / "bin" / "helm"
    for candidate in (os.environ.get("RAYLANE_HELM"), shutil.which("helm"), str(cache)):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def run_helm(helm: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm, *args], capture_output=True, text=True, timeout=60, check=False)


def pod_templates(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every pod template the chart renders (its metadata and spec), keyed by a readable name."""
    templates = {}
    for obj in objects:
        if obj["kind"] in ("Deployment", "StatefulSet"):
            templates[f"{obj['kind']}/{obj['metadata']['name']}"] = obj["spec"]["template"]
        elif obj["kind"] == "RayCluster":
            templates["ray-head"] = obj["spec"]["headGroupSpec"]["template"]
            for group in obj["spec"]["workerGroupSpecs"]:
                templates[f"ray-worker/{group['groupName']}"] = group["template"]
    return templates
