import json

import pytest

from traces.common.errors import TideError
from traces.formats.plan_file import Plan
from traces.formats.shapes import ModelShape
from traces.policies.spec import Policy


def test_round_trip_and_policy(tmp_path):
    s = ModelShape.named("llada2-mini")
    plan = Plan.for_shape(s, tau=[1] * 9 + [4] * 10, budget=[0] + [96] * 18, gpu_mem_bytes=24e9,
                          predicted={"seconds": 1.5}, provenance={"trace": "t.parquet"})
    path = plan.write(tmp_path / "plan.json")
    back = Plan.read(path)
    assert back.tau == plan.tau and back.budget == plan.budget and back.predicted == {"seconds": 1.5}
    pol = Policy.from_plan(back, s)
    assert pol.name == "plan" and pol.budget[0] == 0 and pol.tau[-1] == 4
    assert back.expert_bytes_on_gpu(s) == 18 * 96 * s.expert_bytes()


@pytest.mark.parametrize("edit, fragment", [
    (lambda d: d["layers"][0].update(tau=0), "tau must be at least 1"),
    (lambda d: d["layers"][0].update(budget=257), "budgets must lie in 0..256"),
    (lambda d: d["layers"][0].update(budget=1.5), r"layers\[0\].budget must be an integer"),
    (lambda d: d.update(layers=[]), "layers must not be empty"),
    (lambda d: d.update(format="other"), "format"),
    (lambda d: d["layers"].reverse(), "increasing"),
    (lambda d: d["layers"][0].update(kind="lru"), r"layers\[0\].kind must be one of"),
    (lambda d: d["layers"][0].pop("kind"), r"layers\[0\]: lacks 'kind'|kind"),
    (lambda d: d["layers"][0].update(kind="swap", budget=0), "swap layer needs a budget"),
    (lambda d: d["layers"][0].update(kind="cpu"), "cpu layer has budget 0"),
    (lambda d: d.update(version=5), "plan version 5 is not supported"),
    (lambda d: d.update(batch_size=0), "batch_size must be at least 1"),
    (lambda d: d["layers"][0].update(resident=[1, 2]), "only a static layer lists its residents"),
    (lambda d: d["layers"][0].update(kind="static", resident=[1, 2]), "lists 2 residents; a static layer lists exactly"),
    (lambda d: d["layers"][0].update(kind="static", resident=[300] * 64), "lists 64 residents"),
])
def test_bad_plans(tmp_path, edit, fragment):
    d = Plan.for_shape(ModelShape.named("llada2-mini"), 2, 64).to_json()
    edit(d)
    path = tmp_path / "p.json"
    path.write_text(json.dumps(d))
    with pytest.raises(TideError, match=fragment):
        Plan.read(path)


def test_plan_for_another_model_is_refused():
    plan = Plan.for_shape(ModelShape.named("llada2-mini"), 2, 64)
    with pytest.raises(TideError, match="plan is for llada2-mini"):
        Policy.from_plan(plan, ModelShape.named("llada2-flash"))


def test_mixed_kinds_round_trip_and_version_1_still_loads(tmp_path):
    s = ModelShape.named("llada2-mini")
    kinds = ["cpu", "static", "swap"] + ["tide"] * 16
    plan = Plan.for_shape(s, tau=[0, 0, 0] + [4] * 16, budget=[0, 256, 32] + [96] * 16, kind=kinds)
    back = Plan.read(plan.write(tmp_path / "mixed.json"))
    assert back.kinds == kinds and back.tau[:4] == [0, 0, 0, 4]
    d = json.loads((tmp_path / "mixed.json").read_text())
    assert d["version"] == 4 and "tau" not in d["layers"][2] and d["layers"][3]["tau"] == 4
    assert d["batch_size"] == 1 and back.batch_size == 1
    pol = Policy.from_plan(back, s)
    assert pol.kinds == kinds and pol.swap_rows.tolist()[:3] == [False, False, True]
    old = {**d, "version": 1, "layers": [{"layer": r["layer"], "tau": 2, "budget": 64} for r in d["layers"]]}
    (tmp_path / "v1.json").write_text(json.dumps(old))
    v1 = Plan.read(tmp_path / "v1.json")
    assert v1.kinds == ["tide"] * 19 and Policy.from_plan(v1, s).tau.tolist() == [2] * 19
    v2 = {**d, "version": 2, "batch_size": 9}  # version 2 had no batch size: 1
    (tmp_path / "v2.json").write_text(json.dumps(v2))
    assert Plan.read(tmp_path / "v2.json").batch_size == 1


def test_a_plan_holds_its_batch_size_and_static_residents(tmp_path):
    """Version 3: the batch size the plan was made for, and each static layer's residents,
    which the policy fixes in place of its setup counts' top B."""
    import numpy as np

    from traces.policies.runner import PolicyRunner
    s = ModelShape.named("llada2-mini")
    kinds = ["static"] + ["tide"] * 18
    plan = Plan.for_shape(s, tau=[0] + [2] * 18, budget=[3] + [64] * 18, kind=kinds, batch_size=8,
                          resident={0: [5, 17, 200]})
    back = Plan.read(plan.write(tmp_path / "p.json"))
    assert back.batch_size == 8 and back.resident == {0: [5, 17, 200]}
    pol = Policy.from_plan(back, s)
    counts = np.zeros((19, 256), np.int64)
    counts[:, :10] = 5  # the setup counts would pick experts 0-2; the plan's residents win
    runner = PolicyRunner(pol, 256)
    runner.begin("prefill", 0)
    runner.layer(0, counts[0])
    assert np.flatnonzero(runner.state.resident[0]).tolist() == [5, 17, 200]
    assert pol.to_json()["resident"] == {"0": [5, 17, 200]}

