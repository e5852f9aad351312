"""Data at corpus scale (DESIGN 12): the speed of `prepare`, a worker's memory on a large prepared
corpus against a small one, and the step time when windows come from shards instead of memory.

    python bench/data.py [--quick]

prepare_mb_per_s              text MB/s of `prepare` (JSONL, byte tokens) on the embedded local Ray,
                              once started, with what bounds it: reading, tokenising and writing
                              measured alone
worker_rss_growth_ratio       a training worker's peak RSS (VmHWM) on a 1 GB prepared corpus over
                              the same on a 64 MB one (target <= 1.1)
step_time_ratio_prepared_vs_memory
                              quickstart step time reading windows from prepared shards (memory
                              map) over the in-memory array (target <= 1.05); interleaved repeats
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, short_quickstart  # noqa: E402

from moe_ray.data import BYTE_EOS, builtin_corpus  # noqa: E402
from moe_ray.spec import DataConfig  # noqa: E402
from moe_ray.storage.token_shards import DatasetWriter, open_dataset, token_dtype  # noqa: E402

BENCH = "data"
WORDS = [w.encode() for w in "the of and to in is for that with on as by it at from this be are or an".split()]


def synthetic_documents(n_bytes: int, seed: int = 0):
    """Deterministic text documents (~4 KB each) of common words, `n_bytes` of them in all."""
    rng = np.random.default_rng(seed)
    made = 0
    while made < n_bytes:
        words = rng.integers(0, len(WORDS), size=800)
        doc = b" ".join(WORDS[w] for w in words).decode()
        made += len(doc)
        yield doc


def write_corpus(out: str, n_bytes: int, seed: int = 0) -> None:
    """A prepared byte-token corpus of `n_bytes` random text in 8 MB documents, the last one the
    validation split (the same size whatever `n_bytes`), written straight through the dataset
    writer: the reading side is what is measured."""
    rng = np.random.default_rng(seed)
    doc = 8 * 2**20
    with DatasetWriter(out, token_dtype(256)) as writer:
        n_docs = max(2, n_bytes // doc)
        for i in range(n_docs):
            text = rng.integers(97, 123, size=doc, dtype=np.uint8)
            text[rng.integers(0, doc, size=doc // 6)] = 32  # spaces
            text[-1] = BYTE_EOS
            writer.splits["val" if i == n_docs - 1 else "train"].add(text)
        writer.finish(
            {
                "source": f"synthetic {n_bytes} bytes",
                "text_format": "synthetic",
                "vocab_size": 256,
                "eos_id": BYTE_EOS,
                "tokenizer": {"spec": "bytes", "file": None, "sha256": None},
            }
        )


def write_jsonl(path: Path, mb: int) -> list[str]:
    docs = list(synthetic_documents(mb * 2**20))
    with path.open("w") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    return docs


def bench_prepare(tmp: Path, mb: int) -> None:
    """prepare's steady rate (after a first, tiny prepare has paid Ray Data's start-up), and
    what bounds it: reading the JSONL with Ray Data alone, tokenising alone (one core, in this
    process), writing the shards alone."""
    import pyarrow as pa
    import ray.data

    from moe_ray.runtime.prepare import _tokenize_batch, prepare, quiet_ray_data

    write_jsonl(tmp / "warmup.jsonl", 1)
    start = time.perf_counter()
    prepare(DataConfig(source=str(tmp / "warmup.jsonl")), str(tmp / "warmup"))
    startup_s = time.perf_counter() - start
    docs = write_jsonl(tmp / "text.jsonl", mb)
    text_mb = sum(len(d) for d in docs) / 1e6
    start = time.perf_counter()
    prepare(DataConfig(source=str(tmp / "text.jsonl")), str(tmp / "prepared"))
    prepare_s = time.perf_counter() - start
    start = time.perf_counter()
    with quiet_ray_data():
        for _ in ray.data.read_json(str(tmp / "text.jsonl")).iter_batches(batch_format="pyarrow", batch_size=None):
            pass
    read_s = time.perf_counter() - start
    start = time.perf_counter()
    ids = _tokenize_batch(pa.table({"text": docs}), "text", "bytes").column("ids").to_pylist()
    tokenize_s = time.perf_counter() - start
    start = time.perf_counter()
    with DatasetWriter(str(tmp / "written"), token_dtype(256)) as writer:
        for i, b in enumerate(ids):
            writer.splits["val" if i % 20 == 19 else "train"].add(np.frombuffer(b, dtype=np.uint8))
        writer.finish({"source": "bench"})
    write_s = time.perf_counter() - start
    emit(
        BENCH,
        "prepare_mb_per_s",
        round(text_mb / prepare_s, 1),
        text_mb=round(text_mb, 1),
        startup_s=round(startup_s, 1),
        read_only_mb_per_s=round(text_mb / read_s, 1),
        tokenize_only_mb_per_s=round(text_mb / tokenize_s, 1),
        write_only_mb_per_s=round(text_mb / write_s, 1),
    )


def peak_rss_mb(tmp: Path, dataset: str, steps: int, name: str) -> float:
    """The highest peak RSS among a quickstart run's workers, read from /proc while it runs."""
    from moe_ray.runtime.driver import run_job

    job = short_quickstart(str(tmp / "runs"), steps).model_copy(update={"data": DataConfig(source=dataset)})
    peaks: dict[int, float] = {}

    def watch(progress) -> None:
        for ev in progress.events:
            for pid in ev.get("pids", []):
                try:
                    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                        if line.startswith("VmHWM:"):
                            peaks[pid] = max(peaks.get(pid, 0.0), int(line.split()[1]) / 1024)
                except OSError:
                    pass  # the worker has ended

    run_job(job, run_name=name, on_progress=watch, poll_s=0.2)
    return max(peaks.values())


def bench_rss(tmp: Path, steps: int) -> None:
    small, large = str(tmp / "corpus-64mb"), str(tmp / "corpus-1gb")
    write_corpus(small, 64 * 2**20)
    write_corpus(large, 2**30)
    small_mb = peak_rss_mb(tmp, small, steps, "rss-small")
    large_mb = peak_rss_mb(tmp, large, steps, "rss-large")
    emit(
        BENCH,
        "worker_rss_growth_ratio",
        round(large_mb / small_mb, 3),
        target="<= 1.1",
        peak_rss_mb_64mb=round(small_mb),
        peak_rss_mb_1gb=round(large_mb),
        steps=steps,
    )


def bench_step_time(tmp: Path, steps: int, repeats: int) -> None:
    """Two identical trainers, one on the in-memory arrays, one on the same tokens prepared into
    shards; blocks of steps alternate between them so that both see the same machine noise."""
    from moe_ray.runtime.prepare import prepare
    from moe_ray.train.trainer import Trainer

    job = short_quickstart(str(tmp / "runs"), steps * repeats)
    memory = builtin_corpus(job.data.max_bytes)
    prepare(job.data, str(tmp / "builtin"))
    prepared = open_dataset(str(tmp / "builtin"))
    assert np.array_equal(prepared.train[:], memory.train)
    trainers = {
        name: Trainer(job.model, job.balance, job.train, data, torch.device("cpu"))
        for name, data in (("memory", memory), ("prepared", prepared))
    }
    times: dict[str, list[float]] = {name: [] for name in trainers}
    for _ in range(repeats):
        for name, trainer in trainers.items():
            start = time.perf_counter()
            for _ in range(steps):
                trainer.run_step()
            times[name].append((time.perf_counter() - start) / steps)
    median = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
    emit(
        BENCH,
        "step_time_ratio_prepared_vs_memory",
        round(median["prepared"] / median["memory"], 3),
        target="<= 1.05",
        step_ms_memory=round(median["memory"] * 1e3, 1),
        step_ms_prepared=round(median["prepared"] * 1e3, 1),
        repeats=repeats,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    import ray

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="moe-ray-bench-data-") as tmp:
        tmp = Path(tmp)
        bench_step_time(tmp, steps=5, repeats=5 if args.quick else 11)
        ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        try:
            bench_prepare(tmp, mb=128 if args.quick else 512)
            bench_rss(tmp, steps=40 if args.quick else 150)
        finally:
            ray.shutdown()


if __name__ == "__main__":
    main()
