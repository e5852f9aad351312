"""The `moe-ray` command line."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import sys
from typing import Annotated

import typer

from moe_ray.secrets import redact
from moe_ray.spec import NAME_PATTERN, JobSpecError, check_run_name, dump_job, load_job

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Train DeepSeek-style MoE models on Ray.")

SetOpt = Annotated[
    list[str] | None, typer.Option("--set", "-s", help="Override a job value: key.sub=value (repeatable).")
]


@contextlib.contextmanager
def exit_on(*errors: type[Exception], code: int = 1):
    """Expected failures (bad input, unreachable storage, ...) end the command with a one-line
    message and an exit code, never a traceback."""
    try:
        yield
    except errors as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(code) from None


CheckpointArg = Annotated[
    str,
    typer.Argument(
        help="A checkpoint folder (local or s3://.../step-NNNNNNNN), or a run's folder for its newest complete one."
    ),
]


def _load(job_file: str, overrides: list[str] | None):
    with exit_on(JobSpecError, code=2):
        return load_job(job_file, overrides or [])


def _run_name(name: str | None, where: str = "--run") -> str | None:
    """A run name checked by the one rule, before any cluster is contacted (exit 2 if bad)."""
    if name is not None:
        with exit_on(JobSpecError, code=2):
            check_run_name(name, where)
    return name


@app.command()
def validate(job_file: str, set_: SetOpt = None) -> None:
    """Check a job file; print the resolved job, or every problem with its dotted path."""
    from moe_ray.sizing import job_size, routing_limits_warning

    job = _load(job_file, set_)
    typer.echo(redact(dump_job(job)), nl=False)  # a ${VAR} may have brought in a URL password
    # As YAML comments: the output stays a valid job file.
    warning = routing_limits_warning(job)
    for line in job_size(job).lines() + ([warning] if warning else []):
        typer.echo(f"# {line}")
    if job.model.init_from:
        from moe_ray.hf import LayoutError
        from moe_ray.hf.init_from import check_init_from
        from moe_ray.storage.s3 import StorageError

        with exit_on(LayoutError, StorageError, code=2):
            typer.echo(f"# init_from: {check_init_from(job)}")
    from moe_ray.data import DataError
    from moe_ray.runtime.data_loading import check_data
    from moe_ray.storage.s3 import StorageError

    with exit_on(DataError, StorageError, code=2):
        typer.echo(f"# data: {check_data(job)}")


@app.command()
def run(
    job_file: str,
    set_: SetOpt = None,
    address: Annotated[str | None, typer.Option(help="Ray cluster to join (default: an embedded local Ray).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the newest run of this job (or --run).")] = False,
    run_name: Annotated[str | None, typer.Option("--run", help="Run name (default: job name + time).")] = None,
) -> None:
    """Train a job: coordinator + expert workers on Ray, with checkpoints."""
    from moe_ray.console import ProgressReporter, console
    from moe_ray.data import DataError
    from moe_ray.hf import LayoutError
    from moe_ray.runtime.driver import RunError, RunInterrupted, run_job
    from moe_ray.storage.s3 import StorageError

    job = _load(job_file, set_)
    run_name = _run_name(run_name)
    reporter = ProgressReporter(job.train.steps, job.train.log_every)
    try:
        result = run_job(
            job, address=address, resume=(run_name or True) if resume else None, run_name=run_name, on_progress=reporter
        )
    except RunInterrupted as err:
        reporter.close()
        sets = [f"--set {shlex.quote(s)}" for s in set_ or []]
        go_on = ["--resume", "--run", err.run_name] if err.checkpoint_step else []
        if os.environ.get("MOE_RAY_SUBMISSION_ID"):  # a submitted job, stopped by `moe-ray stop`
            again = ["moe-ray submit JOB", *go_on, "--address http://HEAD:8265 (and the job's --set options)"]
        else:
            again = ["moe-ray run", shlex.quote(job_file), *sets, *go_on] + (
                [f"--address {address}"] if address else []
            )
        how = "continue it with" if err.checkpoint_step else "start it again with"
        console.print(f"{err}: {how} {' '.join(again)}", highlight=False)
        raise typer.Exit(130) from None
    except (RunError, StorageError, DataError, LayoutError) as err:
        reporter.close()
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2 if isinstance(err, LayoutError) else 1) from None
    reporter.close()
    if result.train_loss is None:  # resumed at its last step: Ray Train had nothing to run
        console.print(
            f"run {result.run_name} had already trained all train.steps={job.train.steps} (checkpoint "
            f"{result.checkpoint}); to train on, raise train.steps (--set train.steps=N) and --resume again",
            highlight=False,
        )
        return
    if result.mlflow_run_id:
        console.print(f"MLflow run {result.mlflow_run_id} at {redact(result.mlflow_uri)}", highlight=False)
    vio = result.max_vio_global
    console.print(
        f"[bold]done[/bold]: run {result.run_name}, {result.final_step} steps in {result.seconds:.0f} s\n"
        f"  train loss {result.train_loss:.4f}, val loss {result.val_loss:.4f}"
        + (f", MaxVio_global {sum(vio) / len(vio):.3f} (per layer {', '.join(f'{v:.3f}' for v in vio)})" if vio else "")
        + f"\n  checkpoint: {result.checkpoint}",
        highlight=False,
    )


@app.command()
def checkpoints(
    run_name: str,
    storage: Annotated[
        str, typer.Option(help="checkpoint.storage of the job (folder or s3://bucket/prefix).")
    ] = "./runs",
    prune: Annotated[
        int | None,
        typer.Option(min=1, help="Delete all but the newest N complete checkpoints (the newest is always kept)."),
    ] = None,
) -> None:
    """List a run's checkpoints with step and size (and prune old ones)."""
    from moe_ray.storage.catalog import list_checkpoints, run_location, runs_there
    from moe_ray.storage.catalog import prune as prune_run
    from moe_ray.storage.s3 import StorageError

    parent, _, name = run_name.rstrip("/").rpartition("/")
    if parent and re.fullmatch(NAME_PATTERN, name):  # a run's folder given for its name
        typer.echo(
            f"error: RUN_NAME {run_name!r} is not a valid run name but a path: "
            f"moe-ray checkpoints {name} --storage {parent}",
            err=True,
        )
        raise typer.Exit(2)
    run = run_location(storage, _run_name(run_name, "RUN_NAME"))
    with exit_on(StorageError):
        if prune is not None:
            for c in prune_run(run, prune):
                typer.echo(f"deleted {c.name}")
        ckpts = list_checkpoints(run)
        if not ckpts:
            typer.echo(f"no checkpoints under {run}{runs_there(storage)}", err=True)
            raise typer.Exit(1)
    typer.echo(f"{'checkpoint':<16} {'step':>8} {'size':>12}  status")
    for c in ckpts:
        typer.echo(f"{c.name:<16} {c.step:>8} {c.size / 2**20:>10.2f}MB  {'complete' if c.complete else 'INCOMPLETE'}")


@app.command()
def scale(
    run: Annotated[str, typer.Argument(help="A local run name, or the submission id of a submitted job.")],
    workers: Annotated[int, typer.Option(min=1, help="The worker count to continue with.")],
    address: Annotated[
        str | None, typer.Option(help="For a submitted job: the Ray dashboard (http://HEAD:8265).")
    ] = None,
) -> None:
    """Change a running run's worker count: it finishes its step, checkpoints, and continues."""
    out = _control_run(run, address, "scale", ["--workers", str(workers)], lambda d: d.request_scale(run, workers))
    if out is None:
        return
    if out.get("unchanged"):
        typer.echo(f"{run} already runs {workers} workers: nothing to do")
    else:
        typer.echo(f"{run}: {out['world_size']} -> {workers} workers at the next step boundary")


@app.command()
def rebalance(
    run: Annotated[str, typer.Argument(help="A local run name, or the submission id of a submitted job.")],
    address: Annotated[
        str | None, typer.Option(help="For a submitted job: the Ray dashboard (http://HEAD:8265).")
    ] = None,
) -> None:
    """Place a running run's experts by recent load, for even tokens per worker; it checkpoints and continues."""
    out = _control_run(run, address, "rebalance", [], lambda d: d.request_rebalance(run))
    if out is not None:
        typer.echo(f"{run}: experts placed by load on its {out['world_size']} workers at the next step boundary")


def _control_run(run: str, address: str | None, command: str, args: list[str], ask):
    """Send `command` to a run's coordinator: through a small job in the cluster for a submitted
    job (returns None), else directly over this machine's (or `address`'s) Ray (returns the reply
    of `ask(driver module)`). The driver (and torch) is imported only for that second case: a
    submitted job's request is sent in seconds."""
    _run_name(run, "RUN")
    if run.startswith("moe-ray-") and address and address.startswith("http"):
        # A submitted job: its coordinator lives in the cluster; ask from a small job there.
        from moe_ray.submit import SubmitError, control_submitted

        with exit_on(SubmitError, JobSpecError):
            sub = control_submitted(address, run, command, *args)
        typer.echo(f"{command} request for {run} sent ({sub})")
        return None
    from moe_ray.runtime import driver
    from moe_ray.runtime.cluster import join
    from moe_ray.runtime.driver import RunError, RunNotFound, run_marker

    marker = run_marker(run)
    if address is None and not marker.is_file():
        typer.echo(f"error: no run {run!r} is running on this machine; for a cluster pass --address", err=True)
        raise typer.Exit(1)
    with exit_on(ConnectionError):  # ClusterAddressError is one
        join(address or marker.read_text().strip(), logging_level="ERROR", log_to_driver=False)
    with exit_on(RunError, ValueError):
        try:
            return ask(driver)
        except RunNotFound:
            if address is not None or not marker.is_file():
                raise
            # Its driver is up (it wrote the marker) but has not made the run's coordinator yet.
            raise RunError(
                f"run {run!r} has not started training yet (it is preparing its data): it takes {command} "
                "requests once its workers start; try again when it logs its first step"
            ) from None


def _data_config(**fields):
    """The data section that a command's arguments describe; a bad one exits 2 naming the option."""
    from pydantic import ValidationError

    from moe_ray.spec import DataConfig

    try:
        return DataConfig(**fields)
    except ValidationError as err:
        e = err.errors()[0]
        name = "SOURCE" if e["loc"][0] == "source" else "--" + str(e["loc"][0]).replace("_", "-")
        typer.echo(f"error: {name}: {e['msg']}", err=True)
        raise typer.Exit(2) from None


@app.command()
def prepare(
    source: Annotated[str, typer.Argument(help="Text, JSONL or Parquet (file or folder, local or s3://), or builtin.")],
    out: Annotated[str, typer.Argument(help="A new folder or s3:// prefix for the token shards.")],
    tokenizer: Annotated[str, typer.Option(help="'bytes', or a tokenizer.json (path or s3://).")] = "bytes",
    format_: Annotated[str, typer.Option("--format", help="auto (from the name), text, jsonl or parquet.")] = "auto",
    text_field: Annotated[str, typer.Option(help="The JSONL field / Parquet column holding the text.")] = "text",
    val_every_nth_doc: Annotated[int, typer.Option(help="Every n-th document goes to validation.")] = 20,
    max_bytes: Annotated[int | None, typer.Option(help="Read at most this much text (default: all).")] = None,
    shard_tokens: Annotated[int | None, typer.Option(min=1, help="Tokens per shard file (default 2^28).")] = None,
    address: Annotated[str | None, typer.Option(help="Ray cluster to run on (default: an embedded local Ray).")] = None,
) -> None:
    """Tokenise a corpus once into token shards that runs read by position (data.source: OUT)."""
    import time

    from moe_ray.console import follow_prepare
    from moe_ray.data import DataError
    from moe_ray.runtime.cluster import ClusterAddressError, join
    from moe_ray.runtime.prepare import prepare as prepare_dataset
    from moe_ray.runtime.prepare import text_rate
    from moe_ray.storage.s3 import StorageError

    cfg = _data_config(
        source=source,
        format=format_,
        text_field=text_field,
        tokenizer=tokenizer,
        val_every_nth_doc=val_every_nth_doc,
        max_bytes=max_bytes,
    )
    start = time.monotonic()
    try:
        with exit_on(DataError, StorageError, ClusterAddressError), follow_prepare() as on_progress:
            if address:
                join(address, ship_code=True, logging_level="ERROR", log_to_driver=False)
            sizes = {"shard_tokens": shard_tokens} if shard_tokens else {}
            manifest = prepare_dataset(cfg, out, on_progress=on_progress, **sizes)
    except KeyboardInterrupt:  # the preparing task was stopped, and removed what it had staged
        typer.echo(f"interrupted: nothing was written to {out}", err=True)
        raise typer.Exit(130) from None
    seconds = time.monotonic() - start
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    typer.echo(
        f"prepared {source} into {out} in {seconds:.1f} s: {train['documents'] + val['documents']:,} documents, "
        f"{train['tokens']:,} train / {val['tokens']:,} val tokens ({manifest['dtype']}, "
        f"{len(train['shards']) + len(val['shards'])} shards), {text_rate(manifest['text_bytes'], seconds)}\n"
        f"  use it in a job: data.source: {out}"
        + ("" if tokenizer == "bytes" else f" and data.tokenizer: {out.rstrip('/')}/tokenizer.json")
    )


TokenizerOpt = Annotated[
    str | None,
    typer.Option(help="The tokenizer.json the model was trained with (needed unless it used byte tokens)."),
]


@app.command(name="eval")
def eval_checkpoint(
    checkpoint: CheckpointArg,
    data: Annotated[
        str | None,
        typer.Option(
            help="Evaluate ALL of this text (as data.source); default: the job's validation split, if built in."
        ),
    ] = None,
    tokenizer: TokenizerOpt = None,
    format_: Annotated[
        str | None, typer.Option("--format", help="With --data: auto (from the name), text, jsonl or parquet.")
    ] = None,
    text_field: Annotated[
        str | None, typer.Option(help="With --data: the JSONL field / Parquet column (default: the job's).")
    ] = None,
    batches: Annotated[
        int | None,
        typer.Option(min=1, help="At most this many batches (default: the job's eval_batches; all of --data)."),
    ] = None,
) -> None:
    """Validation loss, perplexity, MaxVio_global per layer and tokens/s of a checkpoint."""
    from moe_ray.data import DataError, eval_windows, tiling_windows, window_length
    from moe_ray.inference import evaluate_checkpoint, load_model, path_named_by
    from moe_ray.runtime.data_loading import eval_tokens
    from moe_ray.storage.checkpoint import CheckpointError
    from moe_ray.storage.s3 import StorageError

    if data is None and (format_ or text_field):
        typer.echo("error: --format and --text-field describe --data: give it too", err=True)
        raise typer.Exit(2)
    with exit_on(CheckpointError, DataError, StorageError, ValueError):
        loaded = load_model(checkpoint)
        job = loaded.job
        trained = job.data
        given = {
            "source": path_named_by("data", trained.source, data, "--data"),
            "tokenizer": path_named_by("tokenizer", trained.tokenizer, tokenizer, "--tokenizer"),
        }
        if data is not None:  # another text's format is its own: from its name unless given
            given |= {"format": format_ or "auto", "text_field": text_field or trained.text_field}
        data_cfg = _data_config(**(trained.model_dump() | given))
        tokens, description = eval_tokens(data_cfg, job.model.vocab_size, whole=data is not None)
        if data is None:  # the job's own validation set, as training evaluated it
            n = batches or job.train.eval_batches
            window = window_length(job.train.seq_len, job.model.mtp.depth)
            windows = eval_windows(tokens, window, job.train.batch_size, n)
            typer.echo(f"data: {description}; {n} batches of {job.train.batch_size}", err=True)
        else:
            windows = tiling_windows(tokens, job.train.seq_len, 1 + job.model.mtp.depth, job.train.batch_size)
            windows = windows[:batches] if batches else windows
            typer.echo(f"data: {description}", err=True)
        report = evaluate_checkpoint(loaded, windows)
    vio = report.result.max_vio_global.tolist()
    typer.echo(f"checkpoint {loaded.uri} (step {loaded.step})")
    typer.echo(f"  val loss {report.result.loss:.4f}, perplexity {report.result.perplexity:.2f}")
    typer.echo(
        f"  MaxVio_global mean {sum(vio) / max(1, len(vio)):.3f}; per layer " + ", ".join(f"{v:.3f}" for v in vio)
    )
    typer.echo(f"  {report.tokens:,} tokens scored in {report.seconds:.2f} s: {report.tokens_per_s:,.0f} tokens/s")


@app.command()
def generate(
    checkpoint: CheckpointArg,
    prompt: Annotated[str, typer.Option(help="Text to continue.")],
    max_new_tokens: Annotated[int, typer.Option(min=0, help="Tokens to add.")] = 200,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy.")] = 0.8,
    top_k: Annotated[int, typer.Option(min=0, help="Sample among the k most likely tokens (0: all).")] = 40,
    seed: Annotated[int, typer.Option(help="The same seed gives the same text.")] = 0,
    tokenizer: TokenizerOpt = None,
    speculative: Annotated[
        bool, typer.Option("--speculative", help="Draft tokens with the MTP modules; the main model verifies them.")
    ] = False,
    draft_tokens: Annotated[
        int | None,
        typer.Option(min=1, help="Tokens drafted per round with --speculative (default: the MTP depth)."),
    ] = None,
) -> None:
    """Continue a prompt with a trained model (KV cache, the trained routing bias)."""
    import time

    from moe_ray.data import DataError
    from moe_ray.inference import Tokenizer, load_model, path_named_by
    from moe_ray.inference import generate as sample
    from moe_ray.speculative import speculative_generate
    from moe_ray.storage.checkpoint import CheckpointError
    from moe_ray.storage.s3 import StorageError

    with exit_on(CheckpointError, DataError, StorageError):
        loaded = load_model(checkpoint)
        spec = path_named_by("tokenizer", loaded.job.data.tokenizer, tokenizer, "--tokenizer")
        tok = Tokenizer(spec, loaded.job.model.vocab_size)
    if loaded.uri != checkpoint:
        typer.echo(f"(checkpoint {loaded.uri}, step {loaded.step}: the run's newest complete one)", err=True)
    ids = tok.encode(prompt)
    start = time.perf_counter()
    if speculative:
        with exit_on(ValueError, code=2):
            used, new, stats = speculative_generate(
                loaded.model, ids, max_new_tokens, temperature, top_k, seed, draft_tokens
            )
    else:
        used, new = sample(loaded.model, ids, max_new_tokens, temperature, top_k, seed)
    seconds = time.perf_counter() - start
    ctx = loaded.job.model.max_seq_len
    if len(used) < len(ids):
        typer.echo(f"(prompt cut to its last {len(used)} tokens: the context is {ctx})", err=True)
    if len(new) < max_new_tokens:
        typer.echo(f"({len(new)} new tokens, not {max_new_tokens}: the context is {ctx})", err=True)
    typer.echo(tok.decode(used) + tok.decode(new))
    rate = f"{len(new) / max(seconds, 1e-9):,.0f} tokens/s"
    if speculative:
        typer.echo(
            f"(speculative: {stats.accepted}/{stats.drafted} drafted tokens accepted ({stats.acceptance:.0%}), "
            f"{len(new)} tokens from {stats.rounds + 1} forwards of the main model, {rate})",
            err=True,
        )
    else:
        typer.echo(f"({len(new)} tokens, {rate})", err=True)


@app.command()
def export(
    checkpoint: CheckpointArg,
    out: Annotated[
        str, typer.Argument(help="A new folder for the Hugging Face model, or an s3://bucket/prefix holding nothing.")
    ],
    tokenizer: TokenizerOpt = None,
    dtype: Annotated[str, typer.Option(help="float32 (exact) or bfloat16 (half the size).")] = "float32",
    max_shard_mb: Annotated[int, typer.Option(min=1, help="Largest safetensors shard, in MiB.")] = 5000,
) -> None:
    """Write a checkpoint as a Hugging Face glm4_moe model (transformers, vLLM), locally or to S3."""
    from moe_ray.hf import LayoutError
    from moe_ray.hf.export import export_checkpoint
    from moe_ray.hf.folder import DTYPES
    from moe_ray.storage.checkpoint import CheckpointError
    from moe_ray.storage.s3 import StorageError

    if dtype not in DTYPES:
        typer.echo(f"error: --dtype {dtype}: choose one of {', '.join(DTYPES)}", err=True)
        raise typer.Exit(2)
    with exit_on(CheckpointError, LayoutError, StorageError):
        result = export_checkpoint(
            checkpoint,
            out,
            tokenizer,
            dtype,
            max_shard_mb * 2**20,
            on_shard=lambda i, n: typer.echo(f"  shard {i}/{n} written", err=True),
            on_upload=lambda i, n: typer.echo(f"  file {i}/{n} uploaded", err=True),
        )
    mtp = result.config["num_nextn_predict_layers"]
    speculative = f' --speculative-config \'{{"method": "mtp", "num_speculative_tokens": {mtp}}}\'' if mtp else ""
    if out.startswith("s3://"):  # vLLM streams it from S3; transformers reads a local copy
        how = (
            f"  vLLM:         vllm serve {out} --load-format runai_streamer{speculative}\n"
            f"  transformers: copy it to a folder first (aws s3 sync {out} ./model), then from_pretrained('./model')"
        )
    else:
        how = (
            f"  transformers: AutoModelForCausalLM.from_pretrained({out!r})\n"
            f"  vLLM:         vllm serve {out}{speculative}"
        )
    typer.echo(
        f"exported step {result.step} of {result.checkpoint} to {out}: {result.shards} shard(s), "
        f"{result.bytes / 2**20:.1f} MB, glm4_moe {dtype}\n{how}"
    )


AddressOpt = Annotated[str, typer.Option(envvar="RAY_ADDRESS", help="Ray dashboard, e.g. http://HEAD:8265.")]


def _jobs_client(address: str):
    from moe_ray.submit import SubmitError, client

    with exit_on(SubmitError):
        return client(address)


def _submitted_job(address: str, submission_id: str):
    """(a Jobs API client, the job's details); a one-line error when the cluster has no such job."""
    from moe_ray.submit import SubmitError, job_info

    jobs = _jobs_client(address)
    with exit_on(SubmitError):
        return jobs, job_info(jobs, address, submission_id)


@app.command()
def submit(
    job_file: str,
    address: AddressOpt = "http://127.0.0.1:8265",
    set_: SetOpt = None,
    run_name: Annotated[str | None, typer.Option("--run", help="Run name (default: job name + time).")] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run named by --run from its checkpoints.")
    ] = False,
) -> None:
    """Submit a job to a Ray cluster (Ray Jobs API); prints the submission id and MLflow link."""
    from moe_ray.submit import SubmitError, cluster_problems, tracking_warning
    from moe_ray.submit import submit as do_submit

    job = _load(job_file, set_)
    run_name = _run_name(run_name)
    if resume and not run_name:
        typer.echo("error: --resume continues a named run: give it with --run NAME", err=True)
        raise typer.Exit(2)
    problems = cluster_problems(job)
    if problems:
        typer.echo(
            f"error: {job_file} cannot run on a cluster as it is ({len(problems)} problem(s); fix with --set):",
            err=True,
        )
        for p in problems:
            typer.echo(f"  {p}", err=True)
        raise typer.Exit(2)
    if warning := tracking_warning(job):
        typer.echo(warning, err=True)
    with exit_on(SubmitError):
        out = do_submit(job, address, run_name, resume)
    typer.echo(f"submitted {out['submission_id']} (run {out['run_name']})")
    if out["mlflow_link"]:
        typer.echo(f"MLflow run: {redact(out['mlflow_link'])}")
    typer.echo(f"follow it: moe-ray logs {out['submission_id']} --follow --address {address}")


@app.command()
def status(submission_id: str, address: AddressOpt = "http://127.0.0.1:8265") -> None:
    """The state of a submitted job."""
    from moe_ray.submit import job_outcome

    _, info = _submitted_job(address, submission_id)
    meta = info.metadata or {}
    # Ray's message about a failed job holds the tail of its log: its first line and moe-ray's
    # error line are shown (the whole message printed up to 20,000 characters of log).
    said, error = job_outcome(info.message)
    typer.echo(f"{submission_id}: {info.status.value}" + (f" ({said})" if said else ""))
    if error:
        typer.echo(f"  {error}")
    typer.echo(f"  run {meta.get('moe_ray.run', '?')}, MLflow run {meta.get('mlflow_run_id') or '-'}")
    if info.message and said != info.message:
        typer.echo(f"  its log: moe-ray logs {submission_id} --address {address}")


@app.command()
def logs(
    submission_id: str,
    address: AddressOpt = "http://127.0.0.1:8265",
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Stream until the job ends.")] = False,
) -> None:
    """The driver log of a submitted job."""
    jobs, _ = _submitted_job(address, submission_id)
    if not follow:
        typer.echo(jobs.get_job_logs(submission_id), nl=False)
        return
    import asyncio

    async def tail():
        async for chunk in jobs.tail_job_logs(submission_id):
            typer.echo(chunk, nl=False)

    asyncio.run(tail())
    typer.echo(f"[{submission_id}: {jobs.get_job_status(submission_id).value}]", err=True)


@app.command()
def stop(submission_id: str, address: AddressOpt = "http://127.0.0.1:8265") -> None:
    """Stop a submitted job."""
    jobs, _ = _submitted_job(address, submission_id)
    stopped = jobs.stop_job(submission_id)
    typer.echo(f"{submission_id}: {'stop requested' if stopped else 'already finished'}")


@app.command(name="list")
def list_jobs(address: AddressOpt = "http://127.0.0.1:8265") -> None:
    """moe-ray jobs on the cluster, with their state and MLflow run."""
    from moe_ray.submit import moe_jobs

    _jobs_client(address)
    rows = moe_jobs(address)
    if not rows:
        typer.echo(f"no moe-ray jobs at {address} (moe-ray submit JOB --address {address} starts one)")
        return
    typer.echo(f"{'submission id':<52} {'status':<10} {'run':<40} mlflow run")
    for j in rows:
        meta = j.metadata or {}
        typer.echo(
            f"{j.submission_id:<52} {j.status.value:<10} {meta.get('moe_ray.run', ''):<40} "
            f"{meta.get('mlflow_run_id') or '-'}"
        )


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
