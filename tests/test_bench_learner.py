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


def test_bench_learner_threads_side_by_side_and_modes_a_cpu_cannot_run(tmp_path, capsys):
    """--threads 1 2: every figure at each count, with speed-ups over 1 thread; the
    JSON's top-level figures are the best count's, still readable by `bench iteration
    --learner-json`. --mode cudagraphs on a CPU says it needs a GPU and runs the rest."""
    import torch

    from dqd_ray.bench.iteration import _learner_figures

    out = tmp_path / "learner.json"
    before = torch.get_num_threads()
    rc = main(["bench", "learner", "--updates", "2", "--repeats", "1", "--genomes", "1",
               "--states", "16", "--no-previous", "--threads", "2", "1",
               "--mode", "eager", "cudagraphs", "--json", str(out)])
    assert rc == 0 and torch.get_num_threads() == before  # the bench puts it back
    data = json.loads(out.read_text())
    assert data["threads"] == [1, 2] and data["thread_speedup_base"] == 1
    assert [b["threads"] for b in data["by_threads"]] == [1, 2]
    assert "cudagraphs" in data["skipped_modes"] and data["modes"] == ["eager"]
    by = {b["threads"]: b for b in data["by_threads"]}
    assert by[1]["updates"]["ensemble_thread_speedup"] == 1.0
    for b in data["by_threads"]:
        u = b["updates"]
        assert u["single_agent_thread_speedup"] == (u["single_agent_updates_per_s"]
                                                   / by[1]["updates"]["single_agent_updates_per_s"])
        (row,) = b["jacobian"]
        assert (row["genomes"], row["states"]) == (1, 16) and row["jacobian_s"] > 0
    best = data["torch_threads"]
    assert data["updates"] == by[best]["updates"] and data["jacobian"] == by[best]["jacobian"]
    assert best == max(by, key=lambda t: by[t]["updates"]["single_agent_updates_per_s"])
    figures = _learner_figures(str(out), updates=600, states=16)
    assert figures["t_train"] == 600 / data["updates"]["single_agent_updates_per_s"]
    printed = capsys.readouterr().out
    assert "--mode cudagraphs: skipped on cpu: it needs a GPU" in printed
    assert "ensemble_thread_speedup" in printed and "jacobian_thread_speedup" in printed
