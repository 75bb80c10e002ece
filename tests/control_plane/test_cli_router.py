"""`raylane router serve` options through typer's test runner (serving: tests/e2e/test_metrics_scrape.py)."""

from __future__ import annotations

import re

from typer.testing import CliRunner

from control_plane.cli import app

runner = CliRunner()


def _flat(text: str) -> str:
    """Help text without rich's box drawing and line wrapping."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


def test_help_explains_the_metrics_port():
    result = runner.invoke(app, ["router", "serve", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    help_text = _flat(result.output)
    assert "--metrics-port" in help_text and "9091" in help_text
    assert "0 turns it off, -1 picks a free one" in help_text


def test_bad_metrics_port_is_refused_before_joining_ray():
    result = runner.invoke(app, ["router", "serve", "--metrics-port", "70000", "--address", "127.0.0.1:1"])
    assert result.exit_code == 2, result.output
    assert "metrics_port must be an integer in [1, 65535], 0 (off) or -1 (a free port), got 70000" in _flat(
        result.output
    )
    assert "Traceback" not in result.output


def _dry_run(*args: str) -> dict:
    import yaml

    result = runner.invoke(app, ["router", "serve", "--dry-run", *args])
    assert result.exit_code == 0, result.output
    return yaml.safe_load(result.stdout)


def test_without_a_file_or_flags_router_serve_runs_the_actor_routers_config():
    from control_plane.config import ControlPlaneConfig
    from router.config import RouterConfig
    from router.registry import DEFAULT_POLICY

    served = RouterConfig.from_dict(_dry_run(), "")
    assert served.policy == DEFAULT_POLICY
    assert served == ControlPlaneConfig().router_config(0)  # the control plane's first replica: same tree


def test_flags_override_the_file_and_the_file_overrides_the_defaults(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text(
        "admin_port: 0\nrouter:\n  policy: least_loaded\n  port: 7000\n"
        "  admission: {enabled: true, headroom: 0.8}\n  raylane: {prefix_weight: 2.0}\n"
    )
    data = _dry_run("--config", str(path))
    assert (data["policy"], data["port"], data["admission"]["enabled"]) == ("least_loaded", 7000, True)
    assert data["raylane"]["prefix_weight"] == 2.0 and data["admission"]["headroom"] == 0.8
    data = _dry_run("--config", str(path), "--policy", "p2c", "--no-admission", "--port", "7100")
    assert (data["policy"], data["port"], data["admission"]["enabled"]) == ("p2c", 7100, False)
    assert data["admission"]["headroom"] == 0.8  # what no flag names stays as the file says


def test_a_bad_key_in_the_config_file_is_refused_with_its_path(tmp_path):
    path = tmp_path / "router.yaml"
    path.write_text("admission:\n  enabeld: true\n")
    result = runner.invoke(app, ["router", "serve", "--config", str(path), "--address", "127.0.0.1:1"])
    assert result.exit_code == 2, result.output
    assert "admission.enabeld: unknown key; did you mean 'enabled'?" in _flat(result.output)
    assert "Traceback" not in result.output


def test_help_names_the_config_file_and_the_default_policy():
    result = runner.invoke(app, ["router", "serve", "--help"], env={"COLUMNS": "200"})
    help_text = _flat(result.output)
    assert "--config" in help_text and "`raylane`, the full one" in help_text and "--dry-run" in help_text
