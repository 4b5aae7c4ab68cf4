import json

import pandas as pd

from experiments.workloads import run


def test_workloads_job_writes_traces_table_stats_and_figure(tmp_path):
    table = run(tmp_path, ["llada2-mini"], gen_length=64, prompt_length=64)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"llada2-mini-kv.parquet", "llada2-mini-nokv.parquet", "calibration.parquet", "stats.json",
            "workloads.png"} <= names
    assert not [n for n in names if n.endswith(".tmp")]
    back = pd.read_parquet(tmp_path / "calibration.parquet")
    assert len(back) == len(table) and set(back["model"]) == {"llada2-mini"}
    assert {"check", "value", "low", "high", "ok"} <= set(back.columns)
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["llada2-mini-kv"]["tokens_generated"] == 64
    assert (tmp_path / "workloads.png").read_bytes()[:4] == b"\x89PNG"
