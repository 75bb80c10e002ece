"""The CLI's cluster commands end to end: up → deploy → status → generate → tenant → down.

`up --address` joins the test session's Ray cluster (so the test never starts or stops a Ray
head of its own); every other command talks gRPC through the cluster file, as a user's would.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from typer.testing import CliRunner

from control_plane.cli import app
from router.client import QuotaExceededError

pytestmark = pytest.mark.slow


def _invoke(runner: CliRunner, *args: str):
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


def test_cli_runs_a_cluster(ray_cluster, tiny_llama, tmp_path):
    runner = CliRunner()
    state = str(tmp_path / "state")
    config = tmp_path / "cluster.yaml"
    config.write_text("admin_port: 0\nrouter: {port: 0, http_port: -1}\nreconcile_interval_s: 0.5\n")
    address = ray_cluster.get_runtime_context().gcs_address

    code, output = _invoke(runner, "up", "--address", address, "--config", str(config), "--state-dir", state)
    assert code == 0, output
    assert "cluster up" in output
    try:
        deployment = tmp_path / "cli.yaml"
        deployment.write_text(f"name: cli\nmodel: {tiny_llama}\npools:\n  - role: mixed\n    replicas: 1\n")
        code, output = _invoke(runner, "deploy", str(deployment), "--state-dir", state)
        assert code == 0 and "applied cli v1" in output, output

        deadline = time.monotonic() + 90
        while True:
            code, output = _invoke(runner, "status", "--state-dir", state)
            assert code == 0, output
            if "1/1 healthy" in output:
                break
            assert time.monotonic() < deadline, output
            time.sleep(0.5)
        assert "cli-mixed-0" in output
        assert "OpenAI-compatible HTTP: http://127.0.0.1:" in output

        generate = ("generate", "hello", "--deployment", "cli", "--max-tokens", "5")
        code, output = _invoke(runner, *generate, "--state-dir", state)
        assert code == 0 and "5 tokens" in output, output
        code, output = _invoke(runner, *generate, "--stream", "--state-dir", state)
        assert code == 0 and output.strip(), output

        trace = tmp_path / "trace.csv"
        trace.write_text(
            "TIMESTAMP,ContextTokens,GeneratedTokens\n"
            + "".join(f"2023-11-16 18:15:4{i}.0000000,{20 + 10 * i},{3 + i}\n" for i in range(4))
        )
        report = tmp_path / "replay.png"
        replay = ("bench", "replay", str(trace), "--deployment", "cli", "--duration", "10", "--report", str(report))
        code, output = _invoke(runner, *replay, "--state-dir", state)
        assert code == 0, output
        summary = json.loads(output[output.index("{") :])
        assert summary["overall"]["num_ok"] == 4 and summary["overall"]["output_tokens"] == 3 + 4 + 5 + 6
        assert report.read_bytes().startswith(b"\x89PNG")

        code, output = _invoke(runner, "tenant", "create", "acme", "--max-concurrent", "2", "--state-dir", state)
        assert code == 0 and output.strip().splitlines()[-1].startswith("rl-"), output
        code, output = _invoke(runner, "tenant", "keys", "acme", "--state-dir", state)
        assert code == 0 and output.strip().splitlines()[-1].startswith("rl-"), output
        code, output = _invoke(runner, "tenant", "list", "--state-dir", state)
        assert "acme  max_concurrent=2" in output and "default" in output

        broken = tmp_path / "broken.yaml"
        broken.write_text(f"name: cli\nmodel: {tiny_llama}\npools:\n  - role: decoder\n")
        code, output = _invoke(runner, "deploy", str(broken), "--state-dir", state)
        assert code == 2 and "pools[0].role" in output and "Traceback" not in output

        code, output = _invoke(runner, "generate", "hi", "--deployment", "nope", "--state-dir", state)
        assert code == 2 and "unknown deployment" in output and "Traceback" not in output
    finally:
        code, output = _invoke(runner, "down", "--state-dir", state)
    assert code == 0 and "cluster down" in output, output
    code, output = _invoke(runner, "status", "--state-dir", state)
    assert code == 1 and "no cluster is running" in output


def test_cli_kubernetes_style_start_with_separate_router(ray_cluster, tiny_llama, tmp_path):
    """The Helm chart's flow: `up` with deployments, a bootstrap key and no routers; `router serve` on its own."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    from router.client import Client

    runner = CliRunner()
    state = str(tmp_path / "state")
    # One file for both, as the chart's ConfigMap: `up` reads it all, `router serve --config` its router section.
    (tmp_path / "cluster.yaml").write_text(
        "admin_port: 0\nreconcile_interval_s: 0.5\nrouter: {policy: raylane, admission: {enabled: true}}\n"
    )
    (tmp_path / "deployments").mkdir()
    # A 1 MiB KV pool (128 blocks) so an overload burst meets admission control.
    (tmp_path / "deployments" / "chat.yaml").write_text(
        f"deployment:\n  name: chat\n  model: {tiny_llama}\n  pools:\n    - role: mixed\n"
        "  engine:\n    kv_cache_bytes: 1048576\n"
    )
    (tmp_path / "api-key").write_text("operator-key-from-a-secret-0123\n")
    address = ray_cluster.get_runtime_context().gcs_address
    up = ("up", "--address", address, "--config", str(tmp_path / "cluster.yaml"), "--state-dir", state)
    flags = ("--deployments-dir", str(tmp_path / "deployments"), "--bootstrap-tenant", "acme")
    key_flags = ("--bootstrap-key-file", str(tmp_path / "api-key"), "--no-routers")
    code, output = _invoke(runner, *up, *flags, *key_flags)
    assert code == 0 and "applied chat v1" in output and "routers=none" in output, output

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "control_plane.cli", "router", "serve", "--config", str(tmp_path / "cluster.yaml")]
    cmd += ["--address", address, "--port", str(port)]
    cmd.append("--http-port=-1")  # a free port: the default 8000 may be taken on a shared machine
    router_log_path = tmp_path / "router.log"
    router_log = router_log_path.open("w")
    router = subprocess.Popen(
        # The full policy with predictive admission (from the file), end to end on real workers; --verbose logs
        # every decision.
        [*cmd, "--host", "127.0.0.1", "--wait-for-ray", "30", "--verbose"],
        stdout=router_log,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    try:
        with Client(f"127.0.0.1:{port}", "operator-key-from-a-secret-0123", timeout_s=30) as client:
            deadline = time.monotonic() + 120
            while True:
                try:
                    completion = client.complete("chat", "hello", max_tokens=4)
                    break
                except Exception:
                    assert router.poll() is None, router_log_path.read_text()
                    assert time.monotonic() < deadline, "router never served the bootstrap tenant"
                    time.sleep(0.5)
        assert len(completion.token_ids) == 4
        code, output = _invoke(runner, "generate", "hi", "--deployment", "chat", "--state-dir", state)
        assert code == 2 and "--api-key" in output  # the operator's key never lands in the cluster file
        generate = ("generate", "hi", "--deployment", "chat", "--api-key", "operator-key-from-a-secret-0123")
        code, output = _invoke(runner, *generate, "--state-dir", state)
        assert code == 2 and "--router" in output  # nor does a router address: routers run on their own

        code, output = _invoke(runner, "tenant", "create", "bulk", "--max-concurrent", "500", "--state-dir", state)
        bulk_key = output.strip().splitlines()[-1]
        # 150 at once: ~12 fit the KV forecast, 64 may queue per tenant, the rest must be refused.
        outcomes = asyncio.run(_burst(f"127.0.0.1:{port}", bulk_key, num_requests=150))
        rejected = [o for o in outcomes if isinstance(o, QuotaExceededError)]
        completed = [o for o in outcomes if isinstance(o, int)]
        assert rejected and all(e.retry_after_s and e.retry_after_s > 0 for e in rejected)
        assert completed and set(completed) == {48}  # what was admitted (at once or from the queue) ran fully
        assert len(rejected) + len(completed) == len(outcomes), [o for o in outcomes if not isinstance(o, int)]
    finally:
        router.send_signal(signal.SIGTERM)
        assert router.wait(timeout=30) == 0, router_log_path.read_text()
        router_log.close()
        code, output = _invoke(runner, "down", "--state-dir", state)
    assert code == 0, output
    log = router_log_path.read_text()
    assert "route request_id=" in log and "policy=raylane" in log  # one structured line per placement
    assert "admission decision=reject" in log and "admission decision=admit" in log


async def _burst(address: str, api_key: str, *, num_requests: int) -> list:
    from router.client import AsyncClient

    async with AsyncClient(address, api_key, timeout_s=120) as client:

        async def one(i: int):
            prompt = [5 + (i * 7 + j) % 400 for j in range(100)]
            try:
                return len((await client.complete("chat", prompt, max_tokens=48, ignore_eos=True)).token_ids)
            except Exception as exc:
                return exc

        return await asyncio.gather(*(one(i) for i in range(num_requests)))
