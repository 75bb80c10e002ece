"""The fault-injection hooks: inert without `RAYLANE_FAULTS`, and when on, they follow the plan file as it changes."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from workers import faults
from workers.faults import Fault, InjectedFault

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def plan_file(tmp_path, monkeypatch) -> Path:
    """Faults turned on in this process, as `RAYLANE_FAULTS=<path>` would at import."""
    path = tmp_path / "faults.json"
    monkeypatch.setattr(faults, "_PLAN", faults._PlanFile(path))
    return path


def test_off_by_default_every_hook_is_a_no_op():
    env = {k: v for k, v in os.environ.items() if k != faults.ENV_VAR}
    code = (
        "import asyncio, timeit; from workers import faults\n"
        "assert faults._PLAN is None\n"
        # Off means not even the name is looked at: the cost is one global read.
        "faults.hit('no-such-point'); asyncio.run(faults.hit_async('no-such-point'))\n"
        "def noop(point, error=None): return None\n"
        # Best of 5, against a bare function call measured alike: a shared machine's load hits both the same.
        "hook = min(timeit.repeat(lambda: faults.hit('state_write'), number=20_000, repeat=5))\n"
        "bare = min(timeit.repeat(lambda: noop('state_write'), number=20_000, repeat=5))\n"
        "print(hook / bare)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert float(result.stdout) < 3.0  # a function call and a None check: about what any call costs


def test_the_environment_variable_turns_hooks_on_in_a_fresh_process(tmp_path):
    path = tmp_path / "plan.json"
    faults.write_plan(path, {"state_write": Fault(fail=True)})
    code = (
        "import redis; from workers import faults\n"
        "try:\n"
        "    faults.hit('state_write', redis.ConnectionError)\n"
        "except redis.ConnectionError as exc:\n"
        "    print(exc)\n"
        "faults.hit('pd_handoff')\n"  # planned for another point: nothing
    )
    env = {**os.environ, faults.ENV_VAR: str(path)}
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "fault injected at state_write"


def test_a_planned_failure_raises_the_hooks_own_error_type(plan_file):
    faults.write_plan(plan_file, {"state_write": Fault(fail=True)})
    with pytest.raises(redis.ConnectionError, match="fault injected at state_write"):
        faults.hit("state_write", redis.ConnectionError)
    with pytest.raises(InjectedFault):
        faults.hit("state_write")


def test_a_planned_delay_sleeps_without_blocking_the_event_loop(plan_file):
    faults.write_plan(plan_file, {"pd_handoff": Fault(delay_s=0.3)})

    async def run() -> tuple[float, int]:
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        ticker = asyncio.create_task(tick())
        start = time.perf_counter()
        await faults.hit_async("pd_handoff")
        elapsed = time.perf_counter() - start
        ticker.cancel()
        return elapsed, ticks

    elapsed, ticks = asyncio.run(run())
    assert 0.3 <= elapsed < 2.0
    assert ticks >= 10  # the loop ran other work during the hold


def test_a_changed_plan_takes_effect_at_the_next_hit_and_an_empty_one_turns_it_off(plan_file):
    faults.hit("state_write")  # no file yet: nothing planned
    faults.write_plan(plan_file, {"state_write": Fault(fail=True)})
    with pytest.raises(InjectedFault):
        faults.hit("state_write")
    faults.write_plan(plan_file, {})
    faults.hit("state_write")


def test_a_broken_plan_keeps_the_last_good_one(plan_file):
    faults.write_plan(plan_file, {"state_write": Fault(fail=True)})
    with pytest.raises(InjectedFault):
        faults.hit("state_write")
    plan_file.write_text("{not json")
    with pytest.raises(InjectedFault):
        faults.hit("state_write")


def test_an_unknown_point_is_a_bug_at_the_hook_when_faults_are_on(plan_file):
    with pytest.raises(ValueError, match="unknown fault point 'pd_handof'"):
        faults.hit("pd_handof")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], "must be a JSON object"),
        ({"nope": {}}, "unknown fault point 'nope'"),
        ({"pd_handoff": 2}, "must be an object"),
        ({"pd_handoff": {"delay": 1}}, "fields are delay_s and fail"),
        ({"pd_handoff": {"delay_s": -1}}, "delay_s must be"),
        ({"pd_handoff": {"delay_s": float("nan")}}, "delay_s must be"),
        ({"pd_handoff": {"fail": "yes"}}, "fail must be true or false"),
    ],
)
def test_bad_plans_are_refused_with_the_reason(data, message):
    with pytest.raises(ValueError, match=message):
        faults.parse_plan(data)


def test_write_plan_refuses_unknown_points_and_writes_atomically(tmp_path):
    path = tmp_path / "plan.json"
    with pytest.raises(ValueError, match="unknown fault point"):
        faults.write_plan(path, {"nope": Fault()})
    assert not path.exists()
    faults.write_plan(path, {"worker_chunk": Fault(delay_s=0.01)})
    assert json.loads(path.read_text()) == {"worker_chunk": {"delay_s": 0.01, "fail": False}}
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]
