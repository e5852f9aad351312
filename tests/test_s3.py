"""Checkpoints through S3 over real HTTP (moto's server mode) with a real local Ray."""

import os
import re

import boto3
import pytest
import torch
from conftest import builtin_batch_digests, free_port, tiny_job
from faulty_proxy import FaultyProxy

from moe_ray.data import sample_offsets, sample_windows
from moe_ray.runtime.driver import run_job
from moe_ray.storage import checkpoint as ckpt
from moe_ray.storage import s3
from moe_ray.storage.catalog import list_checkpoints, prune, run_location
from moe_ray.storage.location import Location

BUCKET = "moe-ray-test"


@pytest.fixture(scope="module")
def s3_proxy(s3_stack):
    """Everything goes through a proxy that can fail chosen uploads (it passes all else through)."""
    proxy = FaultyProxy(s3_stack.s3_endpoint).start()
    os.environ["AWS_ENDPOINT_URL_S3"] = proxy.endpoint
    yield proxy
    os.environ["AWS_ENDPOINT_URL_S3"] = s3_stack.s3_endpoint
    proxy.stop()


@pytest.fixture(scope="module")
def s3_ray(s3_proxy, local_ray):
    """Ray started after the AWS variables are set, so its workers reach the S3 server too."""
    return local_ray


@pytest.fixture(scope="module")
def s3_run(s3_ray):
    job = tiny_job(
        f"s3://{BUCKET}/runs", train__steps=4, checkpoint__every=2, resources__workers=2, train__audit_data=True
    )
    return job, run_job(job, run_name="s3run")


def copy_run(new_run, keep, alter=lambda key, body: body):
    """A new run holding the objects of `s3run` whose key passes `keep`, each body through `alter`."""
    client = boto3.client("s3")
    for o in s3.list_objects(Location(f"s3://{BUCKET}/runs/s3run")):
        if keep(o["Key"]):
            body = alter(o["Key"], client.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read())
            client.put_object(Bucket=BUCKET, Key=o["Key"].replace("runs/s3run/", f"runs/{new_run}/"), Body=body)


def test_checkpoints_round_trip_through_s3(s3_run):
    job, _ = s3_run
    run = run_location(job.checkpoint.storage, "s3run")
    ckpts = list_checkpoints(run)
    assert [(c.step, c.complete) for c in ckpts] == [(2, True), (4, True)]
    keys = {o["Key"] for o in s3.list_objects(run)}
    assert "runs/s3run/step-00000004/index.json" in keys
    assert any(k.startswith("runs/s3run/step-00000004/experts-00000-00003") for k in keys)
    assert any(k.startswith("runs/s3run/step-00000004/experts-00004-00007") for k in keys)
    # Reading it back from S3: test_resume_with_one_worker_reads_the_same_samples_from_the_runs_s3_data.


def test_tampered_s3_checkpoint_is_not_loaded(s3_run):
    job, _ = s3_run

    # A new run holding the step-2 and step-4 checkpoints, step 4's dense file altered (same size).
    def flip_last_byte_of_step4_dense(key, body):
        return body[:-1] + bytes([body[-1] ^ 0xFF]) if key.endswith("step-00000004/" + ckpt.DENSE) else body

    copy_run("s3bad", lambda key: "/step-00000002/" in key or "/step-00000004/" in key, flip_last_byte_of_step4_dense)
    longer = job.model_copy(update={"train": job.train.model_copy(update={"steps": 5})})
    resumed = run_job(longer, resume="s3bad")
    start = [e for e in resumed.progress.events if e.get("event") == "placement"][0]
    assert start["resumed"] and start["step"] == 2  # the tampered step-4 checkpoint was refused
    assert [m["step"] for m in resumed.progress.metrics] == [2, 3, 4]


def test_one_s3_client_serves_every_thread_until_the_settings_change(monkeypatch):
    """The block reader's threads share one client (making one per GET cost 3.5x the time of 128
    ranged GETs from a local endpoint, and boto3 makes clients unsafely from threads)."""
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:1")
    first = s3.client()
    with ThreadPoolExecutor(8) as pool:
        assert all(c is first for c in pool.map(lambda _: s3.client(), range(32)))
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:2")
    assert s3.client() is not first and s3.client().meta.endpoint_url == "http://127.0.0.1:2"


def test_missing_bucket_refused_before_anything_starts(s3_stack):
    with pytest.raises(s3.StorageError, match="does not exist"):
        s3.check_writable(Location("s3://no-such-bucket/x"))


def test_a_run_prefix_names_its_newest_checkpoint_and_bad_uris_say_what_to_fix(s3_run, monkeypatch):
    import subprocess
    import sys
    from pathlib import Path

    from moe_ray.storage.catalog import resolve_checkpoint

    newest = f"s3://{BUCKET}/runs/s3run/step-00000004"
    assert resolve_checkpoint(f"s3://{BUCKET}/runs/s3run") == newest
    assert resolve_checkpoint(f"s3://{BUCKET}/runs/s3run/step-00000002").endswith("step-00000002")
    with pytest.raises(ckpt.CheckpointError, match="nor a run folder"):
        resolve_checkpoint(f"s3://{BUCKET}/runs/no-such-run")
    with pytest.raises(s3.StorageError, match="bucket 'no-such-bucket' does not exist"):
        resolve_checkpoint("s3://no-such-bucket/runs/s3run")
    with pytest.raises(s3.StorageError, match=f"s3://{BUCKET}/no-such.json does not exist"):
        s3.read_bytes(Location(f"s3://{BUCKET}/no-such.json"))
    # The command line says it in one line, no traceback, and exits 1.
    cli = Path(sys.executable).parent / "moe-ray"
    out = subprocess.run(
        [str(cli), "checkpoints", "s3run", "--storage", "s3://no-such-bucket/runs"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1
    assert out.stderr.strip() == "error: bucket 'no-such-bucket' does not exist (create it, or fix the s3:// URI)"
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)  # it keeps the credentials it found first
    with pytest.raises(s3.StorageError, match="no AWS credentials for s3://.*: set AWS_ACCESS_KEY_ID"):
        resolve_checkpoint(newest)


def test_submit_refuses_a_run_name_the_cluster_would_refuse_before_reaching_it(s3_run, tmp_path):
    from typer.testing import CliRunner

    from moe_ray.cli import app
    from moe_ray.spec import dump_job

    job, _ = s3_run
    (tmp_path / "job.yaml").write_text(dump_job(job))
    nowhere = f"http://127.0.0.1:{free_port()}"  # no cluster: a refusal must come before it is asked

    def submit(*args):
        return CliRunner().invoke(app, ["submit", str(tmp_path / "job.yaml"), *args, "--address", nowhere])

    taken = submit("--run", "s3run")
    assert taken.exit_code == 1 and "already holds that run's checkpoints: continue it with --resume --run s3run" in (
        taken.output
    )
    none = submit("--resume", "--run", "no-such-run")
    assert none.exit_code == 1 and re.search(
        rf"no checkpoints under s3://{BUCKET}/runs/no-such-run \(runs in s3://{BUCKET}/runs: (\S+, )*s3run[,)]",
        " ".join(none.output.split()),
    ), none.output
    # A name that may go ahead is passed on to the cluster (here: not reached).
    for args in (["--resume", "--run", "s3run"], ["--run", "a-new-run"]):
        out = submit(*args)
        assert out.exit_code == 1 and "cannot reach the Ray Jobs API" in out.output, out.output


def test_prune_keeps_newest_complete(s3_run):
    job, _ = s3_run
    copy_run("s3prune", lambda key: "/step-" in key)
    run = run_location(job.checkpoint.storage, "s3prune")
    before = [c.step for c in list_checkpoints(run)]
    assert len(before) >= 2
    deleted = prune(run, keep=1)
    assert [c.step for c in deleted] == before[:-1]
    assert [c.step for c in list_checkpoints(run)] == before[-1:]


def test_resume_with_one_worker_reads_the_same_samples_from_the_runs_s3_data(s3_run):
    """The run's data (the built-in corpus, prepared into its S3 folder) is read by ranged GETs; a
    resume of its step-4 checkpoint from S3 with 1 worker instead of 2 continues to the new last
    step, finds that data again (not prepared anew) and reads exactly the samples it should."""
    job, uninterrupted = s3_run
    copy_run("s3one", lambda key: "/step-00000004/" in key or "/data/" in key)
    client = boto3.client("s3")
    [manifest_key] = [
        o["Key"]
        for o in s3.list_objects(Location(f"s3://{BUCKET}/runs/s3one/data"))
        if o["Key"].endswith("/manifest.json")
    ]
    written = client.head_object(Bucket=BUCKET, Key=manifest_key)["LastModified"]
    one = job.model_copy(
        update={
            "resources": job.resources.model_copy(update={"workers": 1}),
            "train": job.train.model_copy(update={"steps": 5}),
        }
    )
    resumed = run_job(one, resume="s3one")
    start = [e for e in resumed.progress.events if e.get("event") == "placement"][0]
    assert start["resumed"] and start["step"] == 4 and start["world_size"] == 1
    assert [m["step"] for m in resumed.progress.metrics] == [4]
    assert client.head_object(Bucket=BUCKET, Key=manifest_key)["LastModified"] == written
    # The samples of the in-memory stream the data was prepared from, before and after the resume.
    assert [m["batch_digest"] for m in uninterrupted.progress.metrics] == builtin_batch_digests(job, range(4))
    assert [m["batch_digest"] for m in resumed.progress.metrics] == builtin_batch_digests(job, [4])


def test_prepare_from_s3_to_s3_and_read_only_the_windows_asked_for(s3_ray, tmp_path):
    import json

    import numpy as np
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from moe_ray.data import DataError
    from moe_ray.runtime.prepare import prepare
    from moe_ray.spec import DataConfig
    from moe_ray.storage.token_shards import BlockCache, open_dataset

    docs = [f"s3 document {i} " * 3 for i in range(12)]
    client = boto3.client("s3")
    client.put_object(
        Bucket=BUCKET, Key="data/corpus.jsonl", Body="\n".join(json.dumps({"text": d}) for d in docs).encode()
    )
    out = f"s3://{BUCKET}/prepared/bytes"
    # A source with no object at or below it is named before Ray Data is asked (a prefix of a
    # key, data/corpus, is not a folder holding it).
    for missing in ("data/corpus", "data/corpus.jsonl/x", "no-such-corpus/"):
        with pytest.raises(DataError, match=f"data.source 's3://{BUCKET}/{missing}' does not exist"):
            prepare(DataConfig(source=f"s3://{BUCKET}/{missing}", format="jsonl"), out)
    prepare(DataConfig(source=f"s3://{BUCKET}/data", format="jsonl", val_every_nth_doc=4), f"{out}-folder")
    assert ": 12 documents" in open_dataset(f"{out}-folder").description
    prepare(DataConfig(source=f"s3://{BUCKET}/data/corpus.jsonl", val_every_nth_doc=4), out, shard_tokens=100)
    assert open_dataset(out).val[:].tobytes().decode() == "".join(d + "\n" for i, d in enumerate(docs) if i % 4 == 3)
    train = open_dataset(out).train[:]
    assert train.tobytes().decode() == "".join(d + "\n" for i, d in enumerate(docs) if i % 4 != 3)
    # A worker's share of a batch: only the 64-byte blocks under its windows are fetched.
    cache = BlockCache(block_bytes=64, max_bytes=64 * 100)
    data = open_dataset(out, cache)
    rows = sample_windows(data.train, 20, 3, 5, 2, 3)
    assert torch.equal(rows, sample_windows(train, 20, 3, 5, 2, 3))
    starts = sample_offsets(len(train), 20, 3, 5, np.arange(2, 5, dtype=np.uint64))
    blocks = {(s // 100, b) for a in starts for s in range(a, a + 20) for b in [(s % 100) // 64]}
    assert cache.fetches == len(blocks) and cache.fetched_bytes <= 64 * len(blocks)
    sample_windows(data.train, 20, 3, 5, 2, 3)
    assert cache.fetches == len(blocks)  # the second read comes from the cache

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(docs, trainers.WordLevelTrainer(special_tokens=["[UNK]", "</s>"]))
    tok.save(str(tmp_path / "tokenizer.json"))
    client.upload_file(str(tmp_path / "tokenizer.json"), BUCKET, "tok/tokenizer.json")
    cfg = DataConfig(source=f"s3://{BUCKET}/data/corpus.jsonl", tokenizer=f"s3://{BUCKET}/tok/tokenizer.json")
    prepare(cfg, f"s3://{BUCKET}/prepared/words")
    ids = open_dataset(f"s3://{BUCKET}/prepared/words").train[:]
    assert ids.tolist()[: len(tok.encode(docs[0]).ids) + 1] == tok.encode(docs[0]).ids + [tok.token_to_id("</s>")]
    assert (
        client.get_object(Bucket=BUCKET, Key="prepared/words/tokenizer.json")["Body"].read()
        == (tmp_path / "tokenizer.json").read_bytes()
    )


def test_validate_checks_s3_data_when_this_machine_has_credentials_and_says_so_when_not(
    s3_stack, tmp_path, monkeypatch
):
    from typer.testing import CliRunner

    from moe_ray.cli import app
    from moe_ray.spec import dump_job

    boto3.client("s3").put_object(Bucket=BUCKET, Key="validate/corpus.jsonl", Body=b'{"text": "hello"}\n')

    def validate(source, **overrides):
        path = tmp_path / "job.yaml"
        path.write_text(dump_job(tiny_job(tmp_path / "runs", data__source=f"s3://{BUCKET}/{source}", **overrides)))
        return CliRunner().invoke(app, ["validate", str(path)])

    found = validate("validate/corpus.jsonl")
    assert found.exit_code == 0 and "# data: raw jsonl text" in found.output, found.output
    missing = validate("validate/no-such.jsonl")
    assert (
        missing.exit_code == 2
        and f"data.source 's3://{BUCKET}/validate/no-such.jsonl' does not exist" in missing.output
    )
    no_tokenizer = validate("validate/corpus.jsonl", data__tokenizer=f"s3://{BUCKET}/validate/tokenizer.json")
    assert (
        no_tokenizer.exit_code == 2 and f"s3://{BUCKET}/validate/tokenizer.json does not exist" in no_tokenizer.output
    )
    # No credentials here (the cluster has its own): said, and left to the run.
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    unchecked = validate("validate/no-such.jsonl")
    assert unchecked.exit_code == 0 and "not checked here (no AWS credentials on this machine)" in unchecked.output


@pytest.mark.slow
def test_failed_checkpoint_upload_is_never_restored_and_training_goes_on(s3_ray, s3_proxy):
    """Uploads of the step-4 checkpoint fail (HTTP 500 from the endpoint) until the S3 client's
    retries are exhausted: that worker group fails, the next one resumes from the complete
    step-2 checkpoint (not the partial step 4), and the later checkpoints are written normally."""
    job = tiny_job(f"s3://{BUCKET}/runs", train__steps=6, checkpoint__every=2, resources__max_failures=3)
    s3_proxy.fail("/runs/s3fault/step-00000004/", count=10_000)

    def heal_after_restart(progress):
        if any(e.get("event") == "restart" for e in progress.events):
            s3_proxy.fail("", 0)  # the endpoint works again

    result = run_job(job, run_name="s3fault", on_progress=heal_after_restart)
    assert s3_proxy.failed, "no upload was failed: the fault was not injected"
    assert result.final_step == 6
    restarts = [e for e in result.progress.events if e.get("event") == "restart"]
    assert restarts and all(r["cause"] == "worker failure" for r in restarts)
    assert restarts[0]["step"] == 2
    assert [m["step"] for m in result.progress.metrics] == list(range(6))
    ckpts = list_checkpoints(run_location(job.checkpoint.storage, "s3fault"))
    assert [(c.step, c.complete) for c in ckpts if c.step in (4, 6)] == [(4, True), (6, True)]


def test_a_worker_downloads_only_its_own_experts_files(s3_run):
    import torch

    from moe_ray.train.trainer import build_model

    job, _ = s3_run
    path, fs = run_location(job.checkpoint.storage, "s3run").ray_storage()
    step4 = f"{path}/step-00000004"
    shard = build_model(job.model, job.balance, 1, torch.device("cpu"), range(0, 4))
    with ckpt.fetch(step4, fs, shard) as (folder, sizes):
        got = sorted(p.name for p in folder.iterdir())
        ckpt.load(folder, shard, None, sizes)
    assert got == sorted([ckpt.INDEX, ckpt.STATE, ckpt.DENSE, "experts-00000-00003.safetensors"])
    # The same experts as a full download gives.
    full = build_model(job.model, job.balance, 2, torch.device("cpu"))
    with ckpt.local_checkpoint(f"s3://{BUCKET}/runs/s3run/step-00000004") as folder:
        ckpt.load(folder, full, None)
    for a, b in zip(shard.moe_layers(), full.moe_layers(), strict=True):
        assert torch.equal(a.experts.w13, b.experts.w13[0:4]) and torch.equal(a.experts.w2, b.experts.w2[0:4])
    # Another rank's file gone from storage: refused (the checkpoint is incomplete), nothing loaded.
    copy_run("s3partial", lambda key: "/step-00000004/" in key and "experts-00004" not in key)
    partial = f"{path.rsplit('/', 1)[0]}/s3partial/step-00000004"
    with pytest.raises(
        ckpt.CheckpointError, match="experts-00004-00007.safetensors is listed in the index but missing"
    ):
        with ckpt.fetch(partial, fs, shard):
            pass


def test_init_from_an_s3_folder_loads_each_shard_like_a_local_one(s3_stack, tmp_path):
    import torch
    from conftest import write_checkpoint

    from moe_ray.hf.export import export_checkpoint
    from moe_ray.hf.init_from import check_init_from, load_init_from
    from moe_ray.train.trainer import build_model

    job = tiny_job(tmp_path / "runs")
    export_checkpoint(str(write_checkpoint(tmp_path / "ckpt", job)), tmp_path / "export", max_shard_bytes=100_000)
    client = boto3.client("s3")
    for f in (tmp_path / "export").iterdir():
        client.upload_file(str(f), BUCKET, f"models/tiny/{f.name}")
    uri = f"s3://{BUCKET}/models/tiny"
    remote_job = job.model_copy(update={"model": job.model.model_copy(update={"init_from": uri})})
    assert "weights from s3://" in check_init_from(remote_job)
    for experts in (range(0, 4), range(4, 8)):  # the two shards of an EP=2 run
        remote = build_model(job.model, job.balance, 7, torch.device("cpu"), experts)
        local = build_model(job.model, job.balance, 8, torch.device("cpu"), experts)
        load_init_from(remote, uri)
        load_init_from(local, str(tmp_path / "export"))
        assert all(
            torch.equal(a, b) for a, b in zip(remote.state_dict().values(), local.state_dict().values(), strict=True)
        )
    with pytest.raises(Exception, match="no config.json"):
        check_init_from(job.model_copy(update={"model": job.model.model_copy(update={"init_from": uri + "x"})}))


def test_export_reads_a_2_worker_checkpoint_from_s3(s3_run, tmp_path):
    import json

    from moe_ray.hf.export import export_checkpoint

    job, _ = s3_run
    result = export_checkpoint(f"s3://{BUCKET}/runs/s3run/step-00000004", tmp_path / "hf")
    assert result.step == 4
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["n_routed_experts"] == job.model.moe.n_routed_experts
    weights = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())["weight_map"]
    last = job.model.moe.n_routed_experts - 1  # written by the second worker
    assert f"model.layers.1.mlp.experts.{last}.down_proj.weight" in weights


def test_export_to_s3_uploads_the_local_files_config_last_and_a_failed_upload_leaves_nothing(
    s3_run, s3_proxy, tmp_path
):
    from moe_ray.hf import LayoutError
    from moe_ray.hf.export import export_checkpoint

    run = f"s3://{BUCKET}/runs/s3run"  # its newest checkpoint
    dest = Location(f"s3://{BUCKET}/hf/model")
    local = export_checkpoint(run, tmp_path / "hf", max_shard_bytes=100_000)
    config_there = []  # at each upload, whether readers would already see a model
    remote = export_checkpoint(
        run,
        str(dest),
        max_shard_bytes=100_000,
        on_upload=lambda i, n: config_there.append(s3.exists(dest.child("config.json"))),
    )
    assert (remote.step, remote.shards, remote.bytes) == (local.step, local.shards, local.bytes) and local.shards > 1
    assert config_there == [False] * (len(config_there) - 1) + [True]
    client = boto3.client("s3")
    objects = {o["Key"].removeprefix("hf/model/"): o["Key"] for o in s3.list_objects(dest)}
    assert sorted(objects) == sorted(p.name for p in (tmp_path / "hf").iterdir()) and len(objects) == len(config_there)
    for name, key in objects.items():
        assert client.get_object(Bucket=BUCKET, Key=key)["Body"].read() == (tmp_path / "hf" / name).read_bytes(), name
    # A prefix that holds anything is refused before the checkpoint is read.
    with pytest.raises(LayoutError, match="is not empty: give a new prefix"):
        export_checkpoint(f"{run}/no-such-checkpoint", str(dest))
    # An upload that fails for good (the last file, config.json) takes the uploaded shards with it.
    broken = Location(f"s3://{BUCKET}/hf/broken")
    s3_proxy.fail("/hf/broken/config.json", count=10_000)
    try:
        with pytest.raises(s3.StorageError, match="InternalError"):
            export_checkpoint(run, str(broken), max_shard_bytes=100_000)
    finally:
        s3_proxy.fail("", 0)
    assert s3_proxy.failed and s3.list_objects(broken) == []


def _s3_check_case(rank, world, out, uri):
    from moe_ray.runtime.failures import SetupError
    from moe_ray.runtime.worker import check_storage

    if rank == 1:  # a node without credentials of its own (the driver's are never sent)
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            os.environ.pop(name, None)
        os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
    try:
        check_storage(Location(uri), rank, ["10.0.0.1 (node a)", "10.0.0.2 (node b)"])
        (out / f"rank{rank}.txt").write_text("ok")
    except SetupError as err:
        (out / f"rank{rank}.txt").write_text(str(err))


def test_workers_without_s3_access_stop_before_the_first_step_naming_their_node(s3_stack, tmp_path):
    """It showed first at the first checkpoint, hours in, or as a missing dataset."""
    from gloo_cases import require, run_cases

    uri = f"s3://{BUCKET}/runs/no-access"
    folder = require(run_cases([("s3", 2, _s3_check_case, (uri,))], tmp_path), "s3")
    for r in range(2):  # every rank stops, with the same words
        said = (folder / f"rank{r}.txt").read_text()
        assert said.startswith(
            f"the workers on 10.0.0.2 (node b) cannot use checkpoint.storage: no AWS credentials for {uri}"
        ), said
        assert "moe-ray does not send this machine's credentials" in said
    assert s3.list_objects(Location(uri)) == []  # rank 0's probe is gone
