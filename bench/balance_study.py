"""The load-balance study (DESIGN 3, 13): `make study`.

The quickstart's model and data, equal steps and tokens for every run, differing only in how load
is balanced:

  loss_free               the paper's sign rule on the bias        (jobs/balance-loss-free.yaml)
  loss_free_proportional  the proportional controller on the bias  (jobs/balance-loss-free-proportional.yaml)
  aux_0.001, aux_0.01     the classic auxiliary loss, two alphas   (jobs/balance-aux-loss*.yaml)
  none                    no balancing                             (jobs/balance-none.yaml)
  loss_free+seq_1e-4      sign rule + the sequence-wise loss       (jobs/balance-loss-free-seq.yaml)

each with three seeds (model init and data order), plus a sweep of the bias update speed gamma for
both controllers (seed 0). Every run ends with MaxVio_global over a large validation set (its
sampling noise is estimated by a bootstrap over the validation batches and printed beside it)
and over as many fresh windows of the training distribution. Then one run on Ray with skewed
experts (no balancing) and 4 workers measures the per-rank token imbalance (max/mean) before and
after `moe-ray rebalance`.

JSON lines on stdout; the figures also go into bench/results/latest.json; plots and
results.json into --out.

`--confirm-best` adds the other seeds of each controller at the gamma its sweep found best (one
seed finds it, so without this the "best gamma" is one seed's word); with `--resume` after a
study it trains only those runs (4, about 9 minutes here).

    python bench/balance_study.py [--quick | --tiny] [--steps N] [--seeds N] [--procs N] [--out DIR]
                                  [--resume] [--confirm-best]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, machine, save_results  # noqa: E402

from moe_ray.balance import max_violation  # noqa: E402
from moe_ray.config import BalanceConfig  # noqa: E402
from moe_ray.data import builtin_corpus, eval_windows, sample_windows, window_length  # noqa: E402
from moe_ray.spec import load_job  # noqa: E402

BENCH = "balance_study"
ROOT = Path(__file__).resolve().parent.parent
# Variant -> the job file whose `balance` section it uses: the same settings run on Ray as jobs.
VARIANTS = {
    "loss_free": "balance-loss-free",
    "loss_free_proportional": "balance-loss-free-proportional",
    "aux_0.001": "balance-aux-loss-0.001",
    "aux_0.01": "balance-aux-loss",
    "none": "balance-none",
    "loss_free+seq_1e-4": "balance-loss-free-seq",
}
SWEEP = {"sign": (0.001, 0.003, 0.03), "proportional": (0.003, 0.03)}  # besides each job's own gamma
# One-seed probes of the proportional job: V3's freeze of the bias for the last 3% of steps, and
# no weight decay on the routers' weights.
PROBES = {
    "probe_freeze_3pct": ({"bias_freeze_fraction": 0.03}, []),
    "probe_no_router_decay": ({}, ["train.router_weight_decay=false"]),
}
AVERAGE_LAST = 50  # steps whose biases are averaged for the jitter diagnostic
BOOTSTRAP = 200
BLOCKS = 16


def variant_balance(job_name: str) -> BalanceConfig:
    return load_job(ROOT / "jobs" / f"{job_name}.yaml").balance


def settings(args) -> list[str]:
    if args.tiny:
        return [
            "train.steps=6",
            "train.batch_size=4",
            "train.seq_len=32",
            "train.eval_every=3",
            "train.eval_batches=1",
            "model.d_model=32",
            "model.n_heads=2",
            "model.n_layers=2",
            "model.moe.n_routed_experts=8",
            "model.moe.expert_hidden=16",
            "model.moe.top_k=2",
            "data.max_bytes=1000000",
        ]
    steps = args.steps or (200 if args.quick else 600)
    # Equal steps and tokens for every run: 600 x 16 x 128 = 1.2M tokens.
    return [f"train.steps={steps}", f"train.eval_every={max(1, steps // 4)}", "train.eval_batches=8"]


def final_batches(args) -> int:
    """Batches of the final MaxVio_global sets: 256 x 16 x 128 = 524k tokens, windows spread
    evenly over the whole validation split (1.2M bytes)."""
    return 2 if args.tiny else (64 if args.quick else 256)


def per_batch_counts(model, windows) -> tuple[float, torch.Tensor]:
    """Mean loss and (batches, layers, experts) counts, one forward per batch."""
    from moe_ray.train.evaluate import evaluate

    results = [evaluate(model, [w]) for w in windows]
    return float(np.mean([r.loss for r in results])), torch.stack([r.counts for r in results]).double()


def global_vio(counts: torch.Tensor, seed: int = 0) -> tuple[float, float]:
    """MaxVio_global (mean over layers) of counts summed over batches, and its standard error by a
    block bootstrap: the set cut into BLOCKS runs of consecutive batches (neighbouring windows
    share documents, so single batches are not independent), resampled with replacement."""
    rng = np.random.default_rng(seed)
    blocks = torch.stack([b.sum(0) for b in counts.tensor_split(min(BLOCKS, counts.shape[0]))])
    n = blocks.shape[0]
    boots = [float(max_violation(blocks[rng.integers(0, n, n)].sum(0)).mean()) for _ in range(BOOTSTRAP)]
    return float(max_violation(counts.sum(0)).mean()), float(np.std(boots))


def run_one(task: dict) -> dict:
    """One training run in its own process (one thread: two runs share this 2-core machine)."""
    from moe_ray.system import tune_cpu_allocator
    from moe_ray.train.trainer import Trainer

    tune_cpu_allocator()
    torch.set_num_threads(1)
    start = time.time()
    job = load_job(ROOT / "jobs" / "quickstart.yaml", task["settings"] + [f"train.seed={task['seed']}"])
    balance = BalanceConfig.model_validate(task["balance"])
    data = builtin_corpus(job.data.max_bytes)
    trainer = Trainer(job.model, balance, job.train, data, torch.device("cpu"))
    recent_biases = []

    def keep_bias(result):
        if result.step >= job.train.steps - AVERAGE_LAST:
            recent_biases.append(trainer.bias.bias.clone())

    summary = trainer.fit(on_step=keep_bias)
    window = window_length(job.train.seq_len, job.model.mtp.depth)
    batch = job.train.batch_size
    val_loss, val_counts = per_batch_counts(trainer.model, eval_windows(data.val, window, batch, task["batches"]))
    # Fresh training-distribution windows (steps no run reaches): is what val shows the bias's
    # doing, or the validation text being different?
    fresh = [sample_windows(data.train, window, 10**6, 10**6 + i, 0, batch) for i in range(task["batches"])]
    _, train_counts = per_batch_counts(trainer.model, fresh)
    vio, vio_se = global_vio(val_counts)
    train_vio, train_vio_se = global_vio(train_counts)
    # The jitter diagnostic: the same fresh windows routed with the mean of the last biases
    # instead of the last one (the bias the run ends with is what the model keeps).
    avg_vio = None
    if balance.method == "loss_free":
        final = trainer.model.get_expert_bias().clone()
        trainer.model.set_expert_bias(torch.stack(recent_biases).mean(0))
        avg_vio = global_vio(per_batch_counts(trainer.model, fresh)[1])[0]
        trainer.model.set_expert_bias(final)
    return {
        **{k: task[k] for k in ("variant", "seed", "gamma", "policy", "balance", "settings")},
        "val_loss": val_loss,
        "max_vio_global": vio,
        "max_vio_global_se": vio_se,
        "max_vio_global_per_layer": max_violation(val_counts.sum(0)).tolist(),
        "max_vio_train_dist": train_vio,
        "max_vio_train_dist_se": train_vio_se,
        "max_vio_train_dist_avg_bias": avg_vio,
        "max_vio_batch": summary.max_vio_batch,
        "val_curve": [(step, ev.loss) for step, ev in summary.evals],
        "counts": np.stack([r.counts.numpy() for r in summary.history]) if task["keep_counts"] else None,
        "seconds": time.time() - start,
    }


def tasks(args) -> list[dict]:
    base = settings(args)
    seeds = range(1 if args.tiny else args.seeds)
    out = []
    for name, job_name in VARIANTS.items():
        balance = variant_balance(job_name)
        for seed in seeds:
            out.append({"variant": name, "seed": seed, "balance": balance.model_dump(), "keep_counts": seed == 0})
    if not args.tiny:
        for policy, gammas in SWEEP.items():
            template = variant_balance(VARIANTS["loss_free" if policy == "sign" else "loss_free_proportional"])
            for gamma in gammas:
                balance = template.model_copy(update={"bias_update_speed": gamma})
                out.append(
                    {"variant": f"sweep_{policy}", "seed": 0, "balance": balance.model_dump(), "keep_counts": False}
                )
        for name, (update, train) in PROBES.items():
            balance = variant_balance(VARIANTS["loss_free_proportional"]).model_copy(update=update)
            out.append(
                {"variant": name, "seed": 0, "balance": balance.model_dump(), "keep_counts": False, "extra": train}
            )
    for t in out:
        t.update(settings=base + t.pop("extra", []), batches=final_batches(args))
        t["gamma"] = t["balance"]["bias_update_speed"] if t["balance"]["method"] == "loss_free" else None
        t["policy"] = t["balance"]["policy"] if t["balance"]["method"] == "loss_free" else None
    return out


# The main variant that runs each controller at its job's gamma (seeds 0..N-1 already there).
CONTROLLER_VARIANT = {"sign": "loss_free", "proportional": "loss_free_proportional"}


def best_gammas(runs: list[dict]) -> dict[str, float]:
    """Per controller, the gamma whose seed-0 run ended with the lowest MaxVio_global (training text)."""
    return {policy: min(sweep_points(runs, policy), key=lambda p: p[1])[0] for policy in SWEEP}


def at_gamma(runs: list[dict], policy: str, gamma: float) -> list[dict]:
    """Every seed's run of `policy` at `gamma` without the sequence-wise loss: sweep, main variant
    or confirmation."""
    names = (f"sweep_{policy}", CONTROLLER_VARIANT[policy], f"best_gamma_{policy}")
    return [r for r in runs if r["policy"] == policy and r["gamma"] == gamma and r["variant"] in names]


def confirm_tasks(args, runs: list[dict]) -> list[dict]:
    """The seeds that each controller's best gamma still lacks."""
    out = []
    for policy, gamma in best_gammas(runs).items():
        have = {r["seed"] for r in at_gamma(runs, policy, gamma)}
        template = variant_balance(VARIANTS[CONTROLLER_VARIANT[policy]])
        balance = template.model_copy(update={"bias_update_speed": gamma}).model_dump()
        for seed in sorted(set(range(args.seeds)) - have):
            out.append(
                {
                    "variant": f"best_gamma_{policy}",
                    "seed": seed,
                    "balance": balance,
                    "keep_counts": False,
                    "settings": settings(args),
                    "batches": final_batches(args),
                    "gamma": gamma,
                    "policy": policy,
                }
            )
    return out


def task_key(t: dict) -> str:
    return json.dumps([t["variant"], t["seed"], t["balance"], t["settings"]], sort_keys=True)


def mean_spread(values: list[float]) -> dict:
    return {"mean": float(np.mean(values)), "min": float(np.min(values)), "max": float(np.max(values))}


def summarise(runs: list[dict]) -> dict:
    """Per variant: mean and spread over seeds of each figure."""
    out = {}
    for name in VARIANTS:
        mine = [r for r in runs if r["variant"] == name]
        out[name] = {
            "seeds": len(mine),
            "gamma": mine[0]["gamma"],
            "policy": mine[0]["policy"],
            **{
                k: mean_spread([r[k] for r in mine])
                for k in ("val_loss", "max_vio_global", "max_vio_global_se", "max_vio_train_dist")
            },
            **(
                {"max_vio_train_dist_avg_bias": mean_spread([r["max_vio_train_dist_avg_bias"] for r in mine])}
                if mine[0]["max_vio_train_dist_avg_bias"] is not None
                else {}
            ),
            "max_vio_batch_last10pct": mean_spread(
                [float(np.mean(r["max_vio_batch"][-max(1, len(r["max_vio_batch"]) // 10) :])) for r in mine]
            ),
        }
    return out


def sweep_points(runs: list[dict], policy: str) -> list[tuple[float, float, float, float]]:
    """(gamma, MaxVio_global on training-text windows, on the validation split, val loss) of the
    seed-0 runs of one controller, by gamma."""
    pts = [
        r
        for r in runs
        if r["policy"] == policy
        and r["seed"] == 0
        and (r["variant"].startswith("sweep") or r["variant"] in VARIANTS)
        and r["variant"] != "loss_free+seq_1e-4"
    ]
    return sorted((r["gamma"], r["max_vio_train_dist"], r["max_vio_global"], r["val_loss"]) for r in pts)


def plot(runs: list[dict], summary: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from moe_ray.plots import load_heatmap

    paths = []
    main = [r for r in runs if r["variant"] in VARIANTS]
    fig, ax = plt.subplots(figsize=(9, 4))
    for name in VARIANTS:
        curves = np.array([r["max_vio_batch"] for r in main if r["variant"] == name])
        smooth = (
            np.convolve(curves.mean(0), np.ones(10) / 10, mode="valid") if curves.shape[1] >= 10 else curves.mean(0)
        )
        ax.plot(smooth, label=name, lw=1)
    ax.set(
        xlabel="step",
        ylabel="MaxVio_batch (mean over layers and seeds)",
        yscale="log",
        title="load balance during training",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "max_vio_batch.png")
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    names = list(VARIANTS)
    for ax, key, label in (
        (axes[0], "max_vio_train_dist", "MaxVio_global, training-text windows"),
        (axes[1], "max_vio_global", "MaxVio_global, validation split"),
        (axes[2], "val_loss", "validation loss (nats/byte)"),
    ):
        means = [summary[n][key]["mean"] for n in names]
        low = [summary[n][key]["mean"] - summary[n][key]["min"] for n in names]
        high = [summary[n][key]["max"] - summary[n][key]["mean"] for n in names]
        ax.bar(range(len(names)), means, yerr=[low, high], capsize=4, color="tab:blue")
        for i, n in enumerate(names):
            ax.scatter([i] * summary[n]["seeds"], [r[key] for r in main if r["variant"] == n], color="k", s=8, zorder=3)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set(ylabel=label, title=f"{label}\nmean, min-max over seeds", yscale="linear")
        ax.title.set_fontsize(9)
        if key.startswith("max_vio"):
            ax.set_yscale("log")
        else:
            ax.set_ylim(min(r[key] for r in main) - 0.02, max(r[key] for r in main) + 0.02)
    fig.tight_layout()
    paths.append(out / "variants.png")
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for policy in ("sign", "proportional"):
        pts = sweep_points(runs, policy)
        if pts:
            g, vio, _, loss = zip(*pts, strict=True)
            axes[0].plot(g, vio, marker="o", label=policy)
            axes[1].plot(g, loss, marker="o", label=policy)
    axes[0].set(
        xscale="log",
        xlabel="gamma (bias update speed)",
        ylabel="MaxVio_global (training-text windows)",
        title="gamma sweep (seed 0)",
    )
    axes[1].set(
        xscale="log", xlabel="gamma (bias update speed)", ylabel="validation loss", title="gamma sweep (seed 0)"
    )
    for ax in axes:
        ax.legend()
    fig.tight_layout()
    paths.append(out / "gamma_sweep.png")
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(9, 4))
    for name in VARIANTS:
        curves = [r["val_curve"] for r in main if r["variant"] == name]
        steps = [s for s, _ in curves[0]]
        ax.plot(steps, np.mean([[loss for _, loss in c] for c in curves], axis=0), marker="o", label=name)
    ax.set(xlabel="step", ylabel="validation loss (nats/byte, 8 batches)", title="validation loss, mean over seeds")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "val_loss.png")
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)
    for r in main:
        if r["counts"] is not None:
            steps = list(range(len(r["counts"])))
            name = r["variant"]
            paths.append(load_heatmap(steps, r["counts"], out / f"heatmap_{name}.png", title=f"expert load: {name}"))
    return paths


def rank_imbalance(tiny: list[str] | None) -> dict:
    """A run on Ray whose experts are skewed (no balancing), 4 workers (2 with --tiny): per-rank rows received
    (max/mean over ranks, mean over layers, as the workers measure it every step) in contiguous
    blocks, then after `moe-ray rebalance` packs experts by the coordinator's recent load.
    `tiny`: the --tiny model settings (the tests), for a few steps (on 2 workers: each worker
    group's start-up is most of a tiny run's time)."""
    from common import short_quickstart

    from moe_ray.runtime.driver import request_rebalance, run_job

    # The rebalance lands a few steps after it is asked for (the driver's poll, then the next
    # exchange), and a tiny step takes ~50 ms: 20 steps of room, not 4, or the run can end first.
    steps, at, workers = (24, 4, 2) if tiny else (90, 60, 4)
    model = [s for s in tiny or [] if s.startswith(("model.", "train.batch_size", "train.seq_len", "data."))]
    with tempfile.TemporaryDirectory() as storage:
        job = short_quickstart(storage, steps, extra=model)
        job = job.model_copy(
            update={
                "balance": job.balance.model_copy(update={"method": "none", "seq_aux_alpha": 0.0}),
                "resources": job.resources.model_copy(update={"workers": workers, "cpus_per_worker": 0.5}),
            }
        )
        asked = []

        def rebalance(progress):
            if not asked and progress.metrics and progress.metrics[-1]["step"] >= at - 1:
                asked.append(request_rebalance("bench-rebalance"))

        result = run_job(job, run_name="bench-rebalance", on_progress=rebalance, poll_s=0.1)
    restart = next(e for e in result.progress.events if e.get("event") == "restart")
    placement = [e for e in result.progress.events if e.get("event") == "placement"][-1]
    settle = 2  # the first steps of a group include its start-up; the figure is per step anyway
    before = [m["rank_imbalance"] for m in result.progress.metrics if settle <= m["step"] < restart["step"]]
    after = [m["rank_imbalance"] for m in result.progress.metrics if m["step"] >= restart["step"]]
    # The same steps after the rebalance, counted from the coordinator's global counts: with
    # contiguous blocks (what they would have cost: the loads drift while the router learns, so
    # this separates the placement's effect from the drift) and with the placement used (a check
    # of the workers' own measurement; EP = workers, DP 1: a rank receives its experts' global counts).
    from moe_ray.parallel.placement import ExpertPlacement
    from moe_ray.runtime.coordinator import rank_imbalance as imbalance_of

    n = job.model.moe.n_routed_experts
    later = [
        torch.tensor(h["counts"], dtype=torch.float64) for h in result.load_history if h["step"] >= restart["step"]
    ]
    contiguous = ExpertPlacement(n, workers, (0,) * workers)
    used = ExpertPlacement(n, workers, (0,) * workers, placement["orders"])
    return {
        "before": float(np.mean(before)),
        "after": float(np.mean(after)),
        "after_if_contiguous": float(np.mean([imbalance_of(contiguous.rank_loads(c)) for c in later])),
        "after_from_counts": float(np.mean([imbalance_of(used.rank_loads(c)) for c in later])),
        "steps_before": len(before),
        "steps_after": len(after),
        "detail": placement["detail"],
        "workers": workers,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="200 steps, smaller final sets")
    parser.add_argument("--tiny", action="store_true", help="a few steps of a tiny model, one seed (tests)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--procs", type=int, default=2, help="runs at a time (one thread each)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "balance_study")
    parser.add_argument("--no-save", action="store_true", help="do not write bench/results/latest.json")
    parser.add_argument("--resume", action="store_true", help="reuse the finished runs in OUT/runs.jsonl")
    parser.add_argument(
        "--confirm-best", action="store_true", help="all seeds of each controller at its sweep's best gamma"
    )
    args = parser.parse_args()
    if args.confirm_best and args.tiny:
        parser.error("--confirm-best needs the gamma sweep, which --tiny skips")
    args.out.mkdir(parents=True, exist_ok=True)
    todo = tasks(args)
    started = time.time()
    # Every finished run is appended to runs.jsonl at once; --resume takes the runs found there
    # (same settings) instead of training them again, so an interrupted study loses one run.
    journal = args.out / "runs.jsonl"
    done = {}
    if args.resume and journal.is_file():
        for line in journal.read_text().splitlines():
            r = json.loads(line)
            done[task_key(r)] = r
    elif journal.exists():
        journal.unlink()
    runs = [done[task_key(t)] for t in todo if task_key(t) in done]
    todo = [t for t in todo if task_key(t) not in done]
    for r in runs:
        r["counts"] = np.array(r["counts"]) if r["counts"] is not None else None

    def train(todo: list[dict]) -> None:
        with mp.get_context("spawn").Pool(args.procs) as pool:
            for i, r in enumerate(pool.imap_unordered(run_one, todo), 1):
                runs.append(r)
                with journal.open("a") as f:
                    counts = r["counts"].tolist() if r["counts"] is not None else None
                    f.write(json.dumps({**r, "counts": counts}) + "\n")
                print(
                    f"[{i}/{len(todo)}] {r['variant']} seed {r['seed']} gamma {r['gamma']}: val {r['val_loss']:.4f}, "
                    f"MaxVio_global {r['max_vio_global']:.3f} +- {r['max_vio_global_se']:.3f} "
                    f"({r['seconds']:.0f} s; {time.time() - started:.0f} s so far)",
                    file=sys.stderr,
                    flush=True,
                )

    train(todo)
    if args.confirm_best:
        confirm = confirm_tasks(args, runs)
        runs += [done[task_key(t)] for t in confirm if task_key(t) in done]
        train([t for t in confirm if task_key(t) not in done])
    runs.sort(key=lambda r: (r["variant"], r["seed"], r["gamma"] or 0))
    summary = summarise(runs)
    confirmed = best_gammas(runs) if args.confirm_best else {}  # controller -> its best gamma, all seeds run
    steps = load_job(ROOT / "jobs" / "quickstart.yaml", settings(args)).train.steps
    rows = []
    for name, s in summary.items():
        for key in (
            "val_loss",
            "max_vio_global",
            "max_vio_train_dist",
            "max_vio_train_dist_avg_bias",
            "max_vio_batch_last10pct",
        ):
            if key not in s:
                continue
            rows.append(
                emit(
                    BENCH,
                    f"{key}.{name}",
                    round(s[key]["mean"], 4),
                    min=round(s[key]["min"], 4),
                    max=round(s[key]["max"], 4),
                    seeds=s["seeds"],
                    steps=steps,
                )
            )
        rows.append(
            emit(
                BENCH,
                f"max_vio_global_se.{name}",
                round(s["max_vio_global_se"]["mean"], 4),
                note="block-bootstrap standard error over the validation set",
            )
        )
    for policy in SWEEP:
        for gamma, vio, val_vio, loss in sweep_points(runs, policy):
            rows.append(
                emit(
                    BENCH,
                    f"sweep.{policy}.gamma_{gamma}",
                    round(vio, 4),
                    validation_split=round(val_vio, 4),
                    val_loss=round(loss, 4),
                )
            )
    for policy, gamma in confirmed.items():
        mine = at_gamma(runs, policy, gamma)
        rows.append(
            emit(
                BENCH,
                f"best_gamma.{policy}",
                round(float(np.mean([r["max_vio_train_dist"] for r in mine])), 4),
                gamma=gamma,
                seeds=len(mine),
                per_seed=[round(r["max_vio_train_dist"], 4) for r in mine],
                validation_split=round(float(np.mean([r["max_vio_global"] for r in mine])), 4),
                val_loss=round(float(np.mean([r["val_loss"] for r in mine])), 4),
                val_loss_per_seed=[round(r["val_loss"], 4) for r in mine],
            )
        )
    # What the controller achieves on average while it trains: the counts of the last 100 training
    # steps summed (seed 0, whose per-step counts are kept).
    for r in (r for r in runs if r["variant"] in VARIANTS and r["counts"] is not None):
        window = torch.as_tensor(np.asarray(r["counts"][-100:]), dtype=torch.float64).sum(0)
        rows.append(
            emit(BENCH, f"max_vio_last_100_steps.{r['variant']}", round(float(max_violation(window).mean()), 4))
        )
    for r in (r for r in runs if r["variant"] in PROBES):
        rows.append(
            emit(
                BENCH,
                f"{r['variant']}.max_vio_global",
                round(r["max_vio_train_dist"], 4),
                validation_split=round(r["max_vio_global"], 4),
                val_loss=round(r["val_loss"], 4),
            )
        )
    # The headline MaxVio_global is the one whose sampling error is below 0.02: fresh windows from
    # all over the training text (block-bootstrap error <= 0.013). The validation split is a few
    # hundred files, so windows cluster by file and its error is 0.04-0.1: it goes beside.
    vio = "max_vio_train_dist"
    aux = min(("aux_0.001", "aux_0.01"), key=lambda n: summary[n][vio]["mean"])
    # The best controller: of the two at the jobs' gamma, and with --confirm-best also each at the
    # gamma its sweep found best (all seeds).
    candidates = {
        name: {"runs": [r for r in runs if r["variant"] == name], "gamma": summary[name]["gamma"]}
        for name in CONTROLLER_VARIANT.values()
    }
    for policy, gamma in confirmed.items():
        candidates[f"{CONTROLLER_VARIANT[policy]}_gamma_{gamma}"] = {
            "runs": at_gamma(runs, policy, gamma),
            "gamma": gamma,
        }

    def mean_of(name, key):
        return float(np.mean([r[key] for r in candidates[name]["runs"]]))

    best = min(candidates, key=lambda n: mean_of(n, vio))
    best_extra = {
        "variant": best,
        "gamma": candidates[best]["gamma"],
        "seeds": len(candidates[best]["runs"]),
        "validation_split": round(mean_of(best, "max_vio_global"), 4),
    }

    def split(name):
        return {"validation_split": round(summary[name]["max_vio_global"]["mean"], 4)}

    headline = {
        "maxvio_global_loss_free": (summary["loss_free"][vio]["mean"], {"target": "<= 0.05", **split("loss_free")}),
        "maxvio_global_aux_loss": (summary[aux][vio]["mean"], {"variant": aux, **split(aux)}),
        "val_loss_loss_free": (summary["loss_free"]["val_loss"]["mean"], {}),
        "val_loss_aux_loss": (summary[aux]["val_loss"]["mean"], {"variant": aux}),
        "maxvio_global_best_policy": (mean_of(best, vio), best_extra),
        "val_loss_best_policy": (mean_of(best, "val_loss"), {"variant": best}),
    }
    for metric, (value, extra) in headline.items():
        rows.append(emit(BENCH, metric, round(value, 4), **extra))
    imbalance = rank_imbalance(settings(args) if args.tiny else None)
    rows.append(
        emit(
            BENCH,
            "rank_imbalance_before",
            round(imbalance["before"], 3),
            steps=imbalance["steps_before"],
            note=f"max/mean rows per rank, {imbalance['workers']} workers, no balancing, contiguous blocks",
        )
    )
    rows.append(
        emit(
            BENCH,
            "rank_imbalance_after",
            round(imbalance["after"], 3),
            steps=imbalance["steps_after"],
            note="after moe-ray rebalance",
            placement=imbalance["detail"],
            same_steps_if_contiguous=round(imbalance["after_if_contiguous"], 3),
            from_counts=round(imbalance["after_from_counts"], 3),
        )
    )
    paths = plot(runs, summary, args.out)
    results = {
        "steps": steps,
        "summary": summary,
        "runs": [{k: v for k, v in r.items() if k != "counts"} for r in runs],
        "rank_imbalance": imbalance,
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    rows.append(emit(BENCH, "plots", [p.name for p in paths], minutes=round((time.time() - started) / 60, 1)))
    if not (args.no_save or args.tiny):  # a tiny run (the tests) never writes into the checkout
        mode = "tiny" if args.tiny else "quick" if args.quick else "full"
        save_results(rows, {"date": time.strftime("%Y-%m-%d"), "mode": f"study {mode}", **machine()})


if __name__ == "__main__":
    main()
