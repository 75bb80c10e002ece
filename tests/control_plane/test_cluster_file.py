"""The cluster file `raylane up` writes: older files still load, and printed URLs follow the TLS setting."""

from __future__ import annotations

import json

from control_plane.cli_cluster import _http_text
from control_plane.cluster import CLUSTER_FILE, ClusterFile


def cluster_file(**fields) -> ClusterFile:
    base = dict(admin_address="127.0.0.1:1", router_addresses=["127.0.0.1:2"], state_url="", ray_address="")
    return ClusterFile(**base, started_ray=False, **fields)


def test_http_fronts_print_https_when_up_was_given_a_certificate(tmp_path):
    plain = cluster_file(router_http_addresses=["127.0.0.1:8000", "127.0.0.1:8001"])
    assert _http_text(plain) == "http://127.0.0.1:8000/v1, http://127.0.0.1:8001/v1"
    cluster_file(router_http_addresses=["127.0.0.1:8443"], https=True).save(tmp_path)
    assert _http_text(ClusterFile.load(tmp_path)) == "https://127.0.0.1:8443/v1"
    assert _http_text(cluster_file()) == ""


def test_a_cluster_file_written_before_newer_fields_still_loads(tmp_path):
    old = dict(admin_address="127.0.0.1:1", router_addresses=[], state_url="", ray_address="", started_ray=True)
    (tmp_path / CLUSTER_FILE).write_text(json.dumps(old))
    loaded = ClusterFile.load(tmp_path)
    assert loaded.started_ray and not loaded.https and loaded.router_metrics_addresses == []
