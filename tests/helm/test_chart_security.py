"""The chart's admin token Secret and optional TLS, as rendered."""

from __future__ import annotations

import base64
from typing import Any

import yaml


def _by_kind_and_name(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (match,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return match


def _head(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (cluster,) = [o for o in objects if o["kind"] == "RayCluster"]
    return cluster["spec"]["headGroupSpec"]["template"]["spec"]


def _cluster_config(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return yaml.safe_load(_by_kind_and_name(objects, "ConfigMap", "rl-raylane-cluster")["data"]["cluster.yaml"])


def test_admin_token_is_generated_kept_and_mounted_into_the_head(render):
    objects = render()
    secret = _by_kind_and_name(objects, "Secret", "rl-raylane-admin-token")
    assert len(base64.b64decode(secret["data"]["admin-token"])) == 48
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert _cluster_config(objects)["admin_token_file"] == "/etc/raylane/admin/token"
    head = _head(objects)
    volume = {v["name"]: v for v in head["volumes"]}["admin-token"]["secret"]
    assert volume["secretName"] == "rl-raylane-admin-token" and volume["items"] == [
        {"key": "admin-token", "path": "token"}
    ]
    mounts = {m["name"]: m["mountPath"] for m in head["containers"][0]["volumeMounts"]}
    assert mounts["admin-token"] == "/etc/raylane/admin"


def test_an_existing_admin_token_secret_replaces_the_generated_one(render):
    objects = render(None, "adminAuth.existingSecret=ops-admin", "adminAuth.secretKey=token")
    assert not [o for o in objects if o["kind"] == "Secret" and o["metadata"]["name"].endswith("admin-token")]
    volume = {v["name"]: v for v in _head(objects)["volumes"]}["admin-token"]["secret"]
    assert volume["secretName"] == "ops-admin" and volume["items"][0]["key"] == "token"


def test_tls_is_off_by_default_and_mounted_into_head_and_routers_when_named(render):
    plain = render()
    assert "tls_cert_file" not in _cluster_config(plain)
    objects = render(None, "tls.existingSecret=raylane-tls")
    config = _cluster_config(objects)
    assert (config["tls_cert_file"], config["tls_key_file"]) == ("/etc/raylane/tls/tls.crt", "/etc/raylane/tls/tls.key")
    assert {v["name"]: v for v in _head(objects)["volumes"]}["tls"]["secret"]["secretName"] == "raylane-tls"
    router = _by_kind_and_name(objects, "Deployment", "rl-raylane-router")["spec"]["template"]["spec"]
    assert {v["name"]: v for v in router["volumes"]}["tls"]["secret"]["secretName"] == "raylane-tls"
    container = router["containers"][0]
    assert "--tls-cert /etc/raylane/tls/tls.crt --tls-key /etc/raylane/tls/tls.key" in container["args"][0]
    # kubelet gRPC probes speak plaintext only: with TLS they check the listener instead.
    assert "tcpSocket" in container["readinessProbe"] and "grpc" not in container["readinessProbe"]
