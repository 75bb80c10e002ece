"""What the metrics port settings of `ControlPlaneConfig` accept: a port, 0 (off) or -1 (a free port)."""

from __future__ import annotations

import pytest

from control_plane.config import ControlPlaneConfig


@pytest.mark.parametrize("name", ["metrics_port", "router_metrics_port"])
def test_metrics_ports_take_a_port_off_or_a_free_one(name, tmp_path):
    for port in (9100, 0, -1):
        assert getattr(ControlPlaneConfig(state_dir=str(tmp_path), **{name: port}), name) == port
    for bad in (-2, 65536, True, "9090"):
        with pytest.raises(ValueError, match=rf"{name} must be an integer in \[1, 65535\], 0 \(off\) or -1"):
            ControlPlaneConfig(state_dir=str(tmp_path), **{name: bad})


def test_a_free_metrics_port_can_come_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("RAYLANE_ROUTER_METRICS_PORT", "-1")
    assert ControlPlaneConfig.load(state_dir=str(tmp_path)).router_metrics_port == -1
