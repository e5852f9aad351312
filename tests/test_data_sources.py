"""Raw text prepared with Ray Data into token shards (text, JSONL, Parquet; folders; bytes or a
tokenizer.json), read back by position, and runs on raw and prepared data."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import REPLICATED, tiny_job

from moe_ray.data import DataError, batch_digest, sample_windows, window_length
from moe_ray.runtime.data_loading import run_dataset
from moe_ray.runtime.driver import run_job
from moe_ray.runtime.prepare import prepare
from moe_ray.spec import DataConfig, dump_job
from moe_ray.storage.token_shards import open_dataset

CLI = Path(sys.executable).parent / "moe-ray"
DOCS = [f"document number {i}: " + "lorem ipsum dolor sit amet " * (i % 5 + 1) for i in range(40)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    (root / "docs.jsonl").write_text("\n".join(json.dumps({"body": d, "id": i}) for i, d in enumerate(DOCS)))
    (root / "docs.txt").write_text("\n".join(DOCS))
    pq.write_table(pa.table({"body": DOCS}), root / "docs.parquet")
    folder = root / "jsonl_folder"
    folder.mkdir()
    for part in range(2):
        (folder / f"part-{part}.jsonl").write_text(
            "\n".join(json.dumps({"body": d}) for d in DOCS[part * 20 : (part + 1) * 20])
        )
    return root


@pytest.fixture(scope="module")
def word_tokenizer(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(DOCS, trainers.WordLevelTrainer(special_tokens=["[UNK]", "<|endoftext|>"]))
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return tok, path


def expected_bytes(docs, nth):
    val = [d for i, d in enumerate(docs) if i % nth == nth - 1]
    train = [d for i, d in enumerate(docs) if i % nth != nth - 1]
    enc = lambda ds: np.frombuffer("".join(d + "\n" for d in ds).encode(), dtype=np.uint8)  # noqa: E731
    return enc(train), enc(val)


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize(
    "name, fmt", [("docs.jsonl", "auto"), ("docs.parquet", "auto"), ("docs.txt", "auto"), ("jsonl_folder", "jsonl")]
)
def test_formats_give_the_same_stream_in_order(local_ray, corpus, tmp_path, name, fmt):
    cfg = DataConfig(source=str(corpus / name), format=fmt, text_field="body", val_every_nth_doc=10)
    manifest = prepare(cfg, str(tmp_path / "ds"), shard_tokens=300)  # many shards: reads cross them
    data = open_dataset(str(tmp_path / "ds"))
    train, val = expected_bytes(DOCS, 10)
    assert np.array_equal(data.train[:], train) and np.array_equal(data.val[:], val)
    assert manifest["splits"]["train"]["documents"] == 36 and len(manifest["splits"]["train"]["shards"]) > 3
    assert data.description == f"{cfg.source}: 40 documents, {len(train):,} train / {len(val):,} val tokens"
    # Windows by position equal the same windows of the whole array, across shard boundaries.
    for step in range(3):
        assert torch.equal(sample_windows(data.train, 33, 7, step, 2, 6), sample_windows(train, 33, 7, step, 2, 6))
    starts = np.fromfile(tmp_path / "ds" / "train-docs.u64", dtype="<u8")
    assert starts[1] == len(DOCS[0].encode()) + 1 and len(starts) == 36


def test_prepare_is_deterministic_and_says_what_it_did(local_ray, corpus, tmp_path):
    args = [str(CLI), "prepare", str(corpus / "docs.parquet"), "--text-field", "body", "--shard-tokens", "500"]
    first = subprocess.run([*args, str(tmp_path / "a")], capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert "40 documents" in first.stdout and f"data.source: {tmp_path / 'a'}" in first.stdout
    assert "Dataset" not in first.stderr  # no Ray Data progress lines
    prepare(DataConfig(source=str(corpus / "docs.parquet"), text_field="body"), str(tmp_path / "b"), shard_tokens=500)
    assert files_of(tmp_path / "a") == files_of(tmp_path / "b")  # byte-identical, manifest included
    (tmp_path / "plain").mkdir()  # readable by whoever could read a folder made with mkdir
    assert (tmp_path / "a").stat().st_mode == (tmp_path / "plain").stat().st_mode
    again = subprocess.run([*args, str(tmp_path / "a")], capture_output=True, text=True, timeout=300)
    assert again.returncode == 1 and "already holds a prepared dataset" in again.stderr


def test_tokenizer_json_with_end_of_text_between_documents(local_ray, corpus, word_tokenizer, tmp_path):
    tok, path = word_tokenizer
    cfg = DataConfig(source=str(corpus / "docs.jsonl"), text_field="body", tokenizer=str(path))
    manifest = prepare(cfg, str(tmp_path / "ds"), vocab_limit=256)
    data = open_dataset(str(tmp_path / "ds"))
    eos = tok.token_to_id("<|endoftext|>")
    first = tok.encode(DOCS[0]).ids + [eos] + tok.encode(DOCS[1]).ids
    assert manifest["eos_id"] == eos and manifest["dtype"] == "uint8"
    assert data.train[: len(first)].tolist() == first
    assert (tmp_path / "ds" / "tokenizer.json").read_bytes() == path.read_bytes()
    with pytest.raises(DataError, match="raise model.vocab_size"):
        prepare(cfg, str(tmp_path / "small"), vocab_limit=4)


def test_bad_data_refused_with_a_clear_message_and_nothing_left(local_ray, corpus, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(DataError, match="does not exist"):
        prepare(DataConfig(source=str(corpus / "nope.jsonl")), str(out))
    # Raised inside Ray Data's tokenising tasks, handed back with its message and the file named.
    with pytest.raises(DataError, match=r"docs.jsonl: no field 'text' \(has \['body', 'id'\]\); set data.text_field"):
        prepare(DataConfig(source=str(corpus / "docs.jsonl")), str(out))
    with pytest.raises(DataError, match="set data.format"):
        prepare(DataConfig(source=str(corpus / "jsonl_folder")), str(out))
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(DataError, match="found 0 non-empty document"):
        prepare(DataConfig(source=str(tmp_path / "empty.txt")), str(out))
    (tmp_path / "dumps").mkdir()
    (tmp_path / "dumps" / "part-0.data").write_text('{"text": "a document"}\n')
    with pytest.raises(DataError, match=r"no jsonl files in the folder .* named \*.json or \*.jsonl"):
        prepare(DataConfig(source=str(tmp_path / "dumps"), format="jsonl"), str(out))
    (tmp_path / "dumps" / "part-0.data").unlink()
    (tmp_path / "dumps").rmdir()
    (tmp_path / "tokenizer.json").write_text('{"model": ')  # cut short
    with pytest.raises(DataError, match="tokenizer.json' is not a tokenizer.json that tokenizers can read: EOF"):
        prepare(DataConfig(source=str(tmp_path / "empty.txt"), tokenizer=str(tmp_path / "tokenizer.json")), str(out))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt", "tokenizer.json"]  # no dataset, no staging


def test_a_new_attempt_removes_what_killed_ones_staged(local_ray, corpus, tmp_path):
    """A killed prepare (the process or its node gone) cannot clean up after itself: the next
    attempt at the same place removes its hidden staging folder, and no one else's."""
    for leftover in (".out.partial-killed", ".other.partial-x"):
        (tmp_path / leftover).mkdir()
        (tmp_path / leftover / "train-00000.bin").write_bytes(b"\0" * 1000)
    prepare(DataConfig(source=str(corpus / "docs.txt")), str(tmp_path / "out"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.partial-x", "out"]


def test_runs_on_raw_and_on_prepared_data(local_ray, corpus, word_tokenizer, tmp_path, monkeypatch):
    """Raw text is prepared into the run's folder on first use and trains; a prepared dataset is
    read as is, once the job's tokenizer and vocabulary are checked against it. (Runs that read a
    prepared dataset, local and S3, with restarts and rescaling: test_elastic, test_s3.)"""
    job = tiny_job(
        tmp_path / "runs",
        data={"source": str(corpus / "docs.parquet"), "text_field": "body", "val_every_nth_doc": 10},
        train__steps=2,
        train__seq_len=16,
        train__audit_data=True,
        **REPLICATED,
    )
    result = run_job(job, run_name="user-data")
    assert result.final_step == 2 and result.val_loss is not None
    [cache] = (tmp_path / "runs" / "user-data" / "data").iterdir()
    data = open_dataset(str(cache))
    train, _ = expected_bytes(DOCS, 10)
    window = window_length(job.train.seq_len, job.model.mtp.depth)
    for m in result.progress.metrics:  # the run read exactly the windows of the in-memory stream
        assert m["batch_digest"] == batch_digest(sample_windows(train, window, job.train.seed, m["step"], 0, 8))
    assert np.array_equal(data.train[:], train)
    assert run_dataset(job, "user-data")[0] == str(cache)  # a resume finds it
    # Data shorter than a window is named before any worker starts (each worker failed, the
    # group restarted twice, and the run ended on a bare ValueError).
    longer = lambda seq_len: job.model_copy(  # noqa: E731
        update={"train": job.train.model_copy(update={"seq_len": seq_len})}
    )
    with pytest.raises(
        DataError,
        match=r"its validation split holds 623 tokens, fewer than one training window of "
        r"1,002 tokens \(train.seq_len 1000 \+ 1 \+ model.mtp.depth 1\): give more text, lower "
        r"data.val_every_nth_doc \(10: .*\), or lower train.seq_len",
    ):
        run_dataset(longer(1000), "user-data")
    with pytest.raises(DataError, match=r"its train split holds 3,447 tokens, .*: give more text, or lower train"):
        run_dataset(longer(5000), "user-data")

    tok, path = word_tokenizer
    prepared = tmp_path / "prepared"
    prepare(DataConfig(source=str(corpus / "docs.jsonl"), text_field="body", tokenizer=str(path)), str(prepared))
    with pytest.raises(DataError, match=f"set data.tokenizer to {prepared}/tokenizer.json"):
        run_dataset(tiny_job(tmp_path / "runs", data={"source": str(prepared)}), "x")
    (tmp_path / "job.yaml").write_text(dump_job(tiny_job(tmp_path / "runs", data={"source": str(prepared)})))
    checked = subprocess.run([str(CLI), "validate", str(tmp_path / "job.yaml")], capture_output=True, text=True)
    assert checked.returncode == 2 and "set data.tokenizer to" in checked.stderr
    fits = {"source": str(prepared), "tokenizer": str(path)}
    (tmp_path / "job.yaml").write_text(
        dump_job(tiny_job(tmp_path / "runs", data=fits, train__seq_len=2000, model__max_seq_len=2048))
    )
    checked = subprocess.run([str(CLI), "validate", str(tmp_path / "job.yaml")], capture_output=True, text=True)
    assert checked.returncode == 2 and "fewer than one training window" in checked.stderr, checked.stderr
    small = tiny_job(tmp_path / "runs", data={"source": str(prepared), "tokenizer": str(prepared / "tokenizer.json")})
    with pytest.raises(DataError, match="raise model.vocab_size"):
        run_dataset(small.model_copy(update={"model": small.model.model_copy(update={"vocab_size": 8})}), "x")
    # Accepted as it is: the run reads the dataset itself, nothing is prepared into its folder;
    # a relative path reaches the workers as an absolute one (they run in other folders).
    assert run_dataset(small, "on-prepared")[0] == str(prepared)
    monkeypatch.chdir(tmp_path)
    relative = small.model_copy(update={"data": small.data.model_copy(update={"source": "prepared"})})
    assert run_dataset(relative, "on-prepared")[0] == str(prepared.resolve())
    assert not (tmp_path / "runs" / "on-prepared").exists()


def test_prepare_progress_lines_off_a_terminal(capsys):
    from moe_ray.console import follow_prepare

    with follow_prepare(interactive=False, every_s=0) as report:
        report({"documents": 1200, "text_bytes": 5_000_000, "tokens": 5_001_200, "seconds": 2.0})
        report({"documents": 12, "text_bytes": 60_000, "tokens": 60_012, "seconds": 5.0})  # slower than 0.1 MB/s
    err = capsys.readouterr().err
    assert "preparing: 1,200 documents, 5.0 MB of text, 5,001,200 tokens (2.5 MB/s)" in err
    assert "preparing: 12 documents, 0.1 MB of text, 60,012 tokens (0.012 MB/s)" in err  # not "0.0 MB/s"
