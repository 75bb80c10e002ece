"""What the metrics port settings of the config tree accept: a port, 0 (off) or -1 (a free port)."""

from __future__ import annotations

import pytest

from control_plane.config import ControlPlaneConfig


@pytest.mark.parametrize(
    ("name", "get"),
    [("metrics_port", lambda c: c.metrics_port), ("router.metrics_port", lambda c: c.router.metrics_port)],
)
def test_metrics_ports_take_a_port_off_or_a_free_one(name, get, tmp_path):
    def config(port):
        section, _, field = name.rpartition(".")
        data = {section: {field: port}} if section else {field: port}
        return ControlPlaneConfig.from_dict({"state_dir": str(tmp_path), **data})

    for port in (9100, 0, -1):
        assert get(config(port)) == port
    for bad in (-2, 65536, "9090"):
        with pytest.raises(ValueError, match=r"must be an integer in \[1, 65535\], 0 \(off\) or -1|must be an integer"):
            config(bad)
    with pytest.raises(ValueError, match=rf"{name}: must be an integer, got True"):
        config(True)


def test_a_free_metrics_port_can_come_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("RAYLANE_ROUTER__METRICS_PORT", "-1")
    assert ControlPlaneConfig.load(state_dir=str(tmp_path)).router.metrics_port == -1
