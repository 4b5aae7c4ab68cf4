"""The layer's task graph: how a queue runs its tasks, in closed form and as events."""
import json

import numpy as np
import pytest
import simpy

from sim.box import Box
from traces.costs.tasks import Task, finish_s, lanes
from traces.formats.profile_file import Profile, median_of


def _graph(a: float, b: float, c: float, d: float) -> list[Task]:
    s = lambda v: np.array([v], dtype=float)  # noqa: E731
    return [
        Task("route", "gpu", s(a)),
        Task("decide", "host", s(b), ("route",)),
        Task("copy", "h2d", s(c), ("decide",)),
        Task("hits", "gpu", s(d), ("decide",)),
        Task("fresh", "gpu", s(1.0), ("copy",)),
        Task("nothing", "gpu", s(0.0), ("copy",)),  # a zero task occupies no queue
        Task("cpu", "cpu", s(2.0), ("decide",)),
    ]


def _simulated(tasks: list[Task], shares: bool) -> float:
    prof = Profile.load("h200")
    data = json.loads(json.dumps(prof.data))
    if shares:
        data["fast_device"] = "cpu"
    env = simpy.Environment()
    box = Box(env, Profile(data))
    env.process(box.run_tasks(tasks, 0, 0, 0))
    env.run()
    return env.now


@pytest.mark.parametrize("shares", [False, True])
def test_closed_form_and_events_agree(shares):
    rng = np.random.default_rng(0)
    for _ in range(20):
        tasks = _graph(*rng.uniform(0, 3, 4))
        assert finish_s(tasks, lanes(shares))[0] == pytest.approx(_simulated(tasks, shares), rel=1e-12)


def test_queues_run_in_issue_order_and_wait_for_what_they_need():
    tasks = _graph(1.0, 0.5, 3.0, 0.25)
    # GPU: route 0-1, hits 1.5-1.75, fresh waits for the copy (1.5-4.5) -> 5.5; CPU on the host after decide: 1.5-3.5
    assert finish_s(tasks, lanes(False))[0] == pytest.approx(5.5)
    # one queue: everything adds up
    assert finish_s(tasks, lanes(True))[0] == pytest.approx(1.0 + 0.5 + 3.0 + 0.25 + 1.0 + 2.0)


def test_rows_are_priced_independently():
    tasks = [Task("a", "gpu", np.array([1.0, 2.0])), Task("b", "host", np.array([0.0, 1.0]), ("a",))]
    assert finish_s(tasks, lanes(False)).tolist() == [1.0, 3.0]


def test_median_of_keeps_the_typical_measurement():
    a = Profile.load("h200")
    slow = json.loads(json.dumps(a.data))
    slow["host"]["issue_s"]["value"] *= 2
    slow["h2d"]["pinned"]["gbps"] = [g / 2 for g in slow["h2d"]["pinned"]["gbps"]]
    t = slow["cpu_expert_ffn"]
    key = next(iter(t))
    dt = next(iter(t[key]))
    t[key][dt]["seconds"] = [x * 3 for x in t[key][dt]["seconds"]]
    best = median_of([Profile(slow), a, a])
    assert best.host("issue_s") == a.host("issue_s")
    assert best.data["h2d"]["pinned"]["gbps"] == a.data["h2d"]["pinned"]["gbps"]
    assert best.data["cpu_expert_ffn"][key][dt]["seconds"] == a.data["cpu_expert_ffn"][key][dt]["seconds"]


def test_a_version_1_profile_still_loads_with_no_host_costs():
    data = json.loads(json.dumps(Profile.load("h200").data))
    data["version"] = 1
    del data["host"]
    p = Profile(data)
    assert p.host("issue_s") == 0.0 and p.host("forward_s") == 0.0
