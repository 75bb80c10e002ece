"""Session-wide test setup: one torch thread, skip GPU tests without a GPU, tiny models and a shared Ray cluster."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from workers.engine.tiny import make_tiny_lora, make_tiny_model

torch.set_num_threads(int(os.environ.get("RAYLANE_TEST_THREADS", "1")))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """fp32 tiny checkpoints of every supported architecture, keyed by arch name."""
    root = tmp_path_factory.mktemp("tiny-models")
    paths = {}
    for arch in ("llama", "mixtral", "qwen2_moe"):
        paths[arch] = root / arch
        make_tiny_model(arch, paths[arch], seed=0, dtype="float32")
    return paths


@pytest.fixture(scope="session")
def tiny_llama(tiny_models) -> Path:
    return tiny_models["llama"]


@pytest.fixture(scope="session")
def tiny_loras(tiny_llama, tmp_path_factory) -> dict[str, Path]:
    """Two PEFT adapters for the tiny Llama with different ranks."""
    root = tmp_path_factory.mktemp("tiny-loras")
    paths = {"a": root / "a", "b": root / "b"}
    make_tiny_lora(tiny_llama, paths["a"], rank=8, alpha=16, seed=1)
    make_tiny_lora(tiny_llama, paths["b"], rank=4, alpha=4, seed=2)
    return paths


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole run, started only when a test asks for it.

    CPUs are logical, so several 1-CPU worker actors fit on a 2-core machine.
    """
    import ray  # imported here so tests that never touch Ray do not pay for it

    # address="local" starts a fresh cluster even if `raylane up` left one running here.
    ray.init(address="local", num_cpus=8, include_dashboard=False, namespace="raylane", log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def self_signed_tls(tmp_path_factory) -> tuple[str, str]:
    """(certificate file, key file): a self-signed certificate for 127.0.0.1 and localhost, its own CA."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    directory = tmp_path_factory.mktemp("tls")
    cert_file, key_file = directory / "tls.crt", directory / "tls.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    encoding, key_format = serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8
    key_file.write_bytes(key.private_bytes(encoding, key_format, serialization.NoEncryption()))
    return str(cert_file), str(key_file)
