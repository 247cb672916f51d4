"""`dqd-ray bench learner` on a tiny budget: it runs, and its two jacobian methods agree
(the ensemble/separate-agents equivalence is tested in test_td3)."""

from __future__ import annotations

import json

from dqd_ray.cli import main


def test_bench_learner_writes_its_figures(tmp_path, capsys):
    out = tmp_path / "learner.json"
    rc = main(["bench", "learner", "--updates", "4", "--repeats", "1", "--genomes", "1", "2",
               "--states", "16", "300", "--json", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    u = data["updates"]
    assert u["agents"] == 5 and u["batch"] == 256  # QD Ant: fitness + 4 measures
    assert u["ensemble_updates_per_s"] > 0 and u["sequential_updates_per_s"] > 0
    assert u["ratio"] == u["ensemble_updates_per_s"] / u["sequential_updates_per_s"]
    rows = {(r["genomes"], r["states"]): r for r in data["jacobian"]}
    assert set(rows) == {(1, 16), (1, 300), (2, 16), (2, 300)}
    for r in rows.values():
        assert r["jacobian_s"] > 0 and r["previous_s"] > 0
        assert r["max_rel_diff"] < 1e-4  # the two methods compute the same jacobian
    printed = capsys.readouterr().out
    assert "ensemble_updates_per_s" in printed and "speedup" in printed
