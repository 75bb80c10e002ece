"""A short soak (`bench/soak.py`) on the session's Ray cluster: every request ends in exactly one outcome.

Not a timing test: it checks the accounting (sent = completed + failed + cancelled, per kind and in total, with
nothing lost), that the mix really produced each outcome the soak is meant to exercise (quota refusals, expired
deadlines, our own cancellations), that the workers hold no KV block once idle, and that no watched process
(router, workers, control plane, redis-server) outlives the shutdown. RSS growth over 20 s is noise, so the exit
code is only checked to agree with the targets.
"""

from __future__ import annotations

import json

import pytest

from bench import soak

pytestmark = pytest.mark.slow


def test_a_short_soak_loses_nothing_and_leaks_no_block(ray_cluster, tmp_path):
    out = tmp_path / "soak.json"
    exit_code = soak.main(["--duration", "20", "--warmup", "5", "--concurrency", "3", "--out", str(out)])
    report = json.loads(out.read_text())

    assert report["lost"] == 0, report["lost_reasons"]
    assert report["kv_blocks_in_use_end"] == 0 and report["open_streams_end"] == 0
    num_failed = sum(report["failed"].values())
    assert report["completed"] + num_failed + report["cancelled"] == report["sent"] > 0
    by_kind = report["by_kind"]
    for kind, row in by_kind.items():
        assert row["completed"] + sum(row["failed"].values()) + row["cancelled"] + row["lost"] == row["sent"], kind
    for key in ("sent", "completed", "cancelled", "lost"):
        assert sum(row[key] for row in by_kind.values()) == report[key], key
    # The mix did what it is for: answers, the tight tenant's 429s, expired deadlines and our cancellations.
    assert report["completed"] > 0 and report["cancelled"] > 0
    assert {"RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"} <= set(report["failed"])

    names = {p["name"] for p in report["processes"]}
    assert {"driver", "control_plane", "router:0", "redis-server"} <= names
    assert sum(name.startswith("worker:") for name in names) == 4
    assert all(p["fds_start"] > 0 and p["rss_start_mb"] > 0 for p in report["processes"])
    assert report["leftover_processes"] == []
    assert sum(row["requests"] for row in report["per_minute"]) <= report["completed"]
    assert exit_code == (0 if all(report["targets"].values()) else 1)
