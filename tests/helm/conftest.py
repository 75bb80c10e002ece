"""Fixtures for the chart tests: the real `helm` binary and cached renders of the chart."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from helm_support import CHART, NAMESPACE, RELEASE, find_helm, run_helm


@pytest.fixture(scope="session")
def helm() -> str:
    path = find_helm()
    if path is None:
        message = "helm not found ($RAYLANE_HELM, PATH, ~/.cache/raylane/bin); run ci/install_helm.sh"
        if os.environ.get("CI"):
            pytest.fail(f"{message} (CI is set, so the chart tests may not be skipped)")
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def chart_copy(tmp_path_factory) -> Path:
    """The chart with an empty stand-in for the kuberay-operator subchart.

    `helm template` and `helm install` refuse a chart whose declared dependencies are missing from charts/, even
    when their condition is false, and nothing outside the package registries is reachable here to fetch the real
    one. Rendering with `kuberay-operator.enabled=false` never reads the subchart, so an empty chart of the same name
    gives the same output as the real dependency would.
    """
    copy = tmp_path_factory.mktemp("chart") / "raylane"
    shutil.copytree(CHART, copy, ignore=shutil.ignore_patterns("charts"))
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    dependency = next(d for d in chart["dependencies"] if d["name"] == "kuberay-operator")
    vendored = CHART / "charts"
    if vendored.is_dir() and any(vendored.glob("kuberay-operator*")):
        shutil.copytree(vendored, copy / "charts")
    else:
        stand_in = copy / "charts" / "kuberay-operator"
        stand_in.mkdir(parents=True)
        version = dependency["version"].lstrip("~^=<>").split()[0]
        (stand_in / "Chart.yaml").write_text(f"apiVersion: v2\nname: kuberay-operator\nversion: {version}\n")
    return copy


@pytest.fixture(scope="session")
def render(helm, chart_copy) -> Callable[..., list[dict[str, Any]]]:
    """render(values_file=None, *set_args) -> the rendered objects; cached per argument list."""
    cache: dict[tuple[str, ...], list[dict[str, Any]]] = {}

    def _render(values_file: Path | None = None, *set_args: str) -> list[dict[str, Any]]:
        args = ["template", RELEASE, str(chart_copy), "--namespace", NAMESPACE]
        if values_file is not None:
            args += ["-f", str(values_file)]
        for item in set_args:
            args += ["--set", item]
        key = tuple(args)
        if key not in cache:
            result = run_helm(helm, *args)
            assert result.returncode == 0, f"helm {' '.join(args)} failed:\n{result.stderr}"
            cache[key] = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
        return cache[key]

    return _render
