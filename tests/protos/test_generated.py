"""The committed generated modules are exactly what `make protos` produces from the .proto files."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROTO_DIR = REPO / "protos" / "raylane" / "v1"
PROTOS = sorted(PROTO_DIR.glob("*.proto"))
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def test_both_services_are_defined():
    assert {p.name for p in PROTOS} == {"router.proto", "control.proto"}


def test_generated_code_is_fresh(tmp_path):
    pytest.importorskip("grpc_tools", reason="grpcio-tools is a dev extra: pip install -e '.[dev]'")
    for proto in PROTOS:
        dest = tmp_path / proto.relative_to(REPO)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(proto, dest)
    rel = [str(p.relative_to(REPO)) for p in PROTOS]
    cmd = [sys.executable, "-m", "grpc_tools.protoc", "-I.", "--python_out=.", "--grpc_python_out=.", "--pyi_out=."]
    subprocess.run([*cmd, *rel], cwd=tmp_path, check=True)
    for proto in PROTOS:
        for suffix in SUFFIXES:
            name = proto.stem + suffix
            fresh = (tmp_path / proto.relative_to(REPO)).with_name(name).read_text()
            committed = (PROTO_DIR / name).read_text()
            assert fresh == committed, f"protos/raylane/v1/{name} is stale: run `make protos` and commit the result"


def test_generated_modules_import():
    from protos.raylane.v1 import control_pb2_grpc, router_pb2, router_pb2_grpc

    assert router_pb2.DESCRIPTOR.services_by_name["Router"].methods_by_name["Generate"].server_streaming
    assert hasattr(router_pb2_grpc, "RouterServicer")
    assert hasattr(control_pb2_grpc, "ControlPlaneServicer")
