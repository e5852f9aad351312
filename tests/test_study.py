"""The balance study and the ablations run end to end on tiny settings."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_bench(*args):
    proc = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


@pytest.mark.slow
def test_balance_study_tiny(tmp_path):
    rows = run_bench(ROOT / "bench" / "balance_study.py", "--tiny", "--out", tmp_path)
    by = {r["metric"]: r for r in rows}
    variants = {m.split(".", 1)[1] for m in by if m.startswith("val_loss.")}
    assert variants == {"loss_free", "loss_free_proportional", "aux_0.001", "aux_0.01", "none", "loss_free+seq_1e-4"}
    for name in (
        "maxvio_global_loss_free",
        "maxvio_global_aux_loss",
        "val_loss_loss_free",
        "val_loss_aux_loss",
        "maxvio_global_best_policy",
        "val_loss_best_policy",
    ):
        assert by[name]["value"] > 0, name
    # The headline MaxVio_global is the training-text set's (the low-noise one), the better of
    # the two alphas is the aux-loss figure, and the validation split's goes beside.
    aux = min(by["max_vio_train_dist.aux_0.001"]["value"], by["max_vio_train_dist.aux_0.01"]["value"])
    assert by["maxvio_global_aux_loss"]["value"] == aux
    name = by["maxvio_global_aux_loss"]["variant"]
    assert by["maxvio_global_aux_loss"]["validation_split"] == by[f"max_vio_global.{name}"]["value"]
    # The Ray part (2 workers when tiny): skewed experts, a rebalance in between.
    assert by["rank_imbalance_before"]["value"] >= 1.0 and by["rank_imbalance_after"]["value"] >= 1.0
    assert "load-balanced placement" in by["rank_imbalance_after"]["placement"]
    for name in ["max_vio_batch.png", "val_loss.png", "variants.png", "heatmap_loss_free.png", "heatmap_none.png"]:
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG", name
    results = json.loads((tmp_path / "results.json").read_text())
    none = [r for r in results["runs"] if r["variant"] == "none"]
    assert len(none) == 1 and len(none[0]["max_vio_batch"]) == 6


@pytest.mark.slow
def test_ablations_tiny():
    rows = run_bench(ROOT / "bench" / "ablations.py", "--tiny")
    by = {r["metric"]: r for r in rows}
    for pair in ("shared_experts", "segmentation", "mtp", "moe_vs_dense"):
        assert f"{pair}.a.val_loss" in by and f"{pair}.b.val_loss" in by
    # Equal active parameters within a pair (the router and the MTP module aside).
    assert by["shared_experts.a.val_loss"]["active_params"] == by["shared_experts.b.val_loss"]["active_params"]
    seg_a, seg_b = by["segmentation.a.val_loss"]["active_params"], by["segmentation.b.val_loss"]["active_params"]
    assert abs(seg_a - seg_b) < 0.02 * seg_a


def test_confirm_best_adds_the_missing_seeds_at_each_controllers_best_gamma():
    sys.path.insert(0, str(ROOT / "bench"))
    import balance_study as study

    def run(variant, policy, gamma, seed, vio):
        return {
            "variant": variant,
            "policy": policy,
            "gamma": gamma,
            "seed": seed,
            **{"max_vio_train_dist": vio, "max_vio_global": vio, "val_loss": 1.5},
        }

    runs = [
        *(run("loss_free", "sign", 0.01, s, 0.2) for s in range(3)),
        *(run("loss_free_proportional", "proportional", 0.01, s, 0.15) for s in range(3)),
        run("loss_free+seq_1e-4", "sign", 0.01, 0, 0.01),  # not a plain controller: never the best
        run("sweep_sign", "sign", 0.003, 0, 0.12),
        run("sweep_sign", "sign", 0.03, 0, 0.5),
        run("sweep_proportional", "proportional", 0.03, 0, 0.3),
    ]
    assert study.best_gammas(runs) == {"sign": 0.003, "proportional": 0.01}
    args = study.argparse.Namespace(seeds=3, tiny=False, quick=True, steps=None)
    todo = study.confirm_tasks(args, runs)
    # sign lacks seeds 1 and 2 at 0.003; proportional's best is its job's gamma, whose seeds ran.
    assert [(t["variant"], t["seed"], t["balance"]["bias_update_speed"]) for t in todo] == [
        ("best_gamma_sign", 1, 0.003),
        ("best_gamma_sign", 2, 0.003),
    ]
    assert all(t["balance"]["policy"] == "sign" and t["balance"]["bias_freeze_fraction"] == 0 for t in todo)
    runs += [run(t["variant"], "sign", 0.003, t["seed"], 0.1) for t in todo]
    assert [r["seed"] for r in study.at_gamma(runs, "sign", 0.003)] == [0, 1, 2]
    assert study.confirm_tasks(args, runs) == []


def test_saved_results_replace_only_their_benchmarks_rows_and_say_which_run_made_them(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "bench"))
    import common

    monkeypatch.setattr(common, "RESULTS", tmp_path)  # never the checkout's bench/results

    def meta(date, mode):
        return {"date": date, "mode": mode, "cores": 2, "gpu": "none", "torch": "t"}

    common.save_results([{"bench": "a", "metric": "x", "value": 1}], meta("d1", "quick"))
    common.save_results([{"bench": "b", "metric": "y", "value": 2}], meta("d2", "study full"))
    common.save_results([{"bench": "a", "metric": "x", "value": 3, "target": "<= 4"}], meta("d3", "full"))
    rows = json.loads((tmp_path / "latest.json").read_text())["results"]
    assert [(r["bench"], r["value"], r["run"]) for r in rows] == [("b", 2, "d2 study full"), ("a", 3, "d3 full")]
    table = (tmp_path / "latest.md").read_text()
    assert "| b | y | 2 |  | d2 study full |" in table and "| a | x | 3 | <= 4 | d3 full |" in table
