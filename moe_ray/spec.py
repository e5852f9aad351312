"""Job specs: one YAML file -> one validated JobSpec (DESIGN 6).

Every section rejects unknown keys. Errors are collected, not raised one at a time, so a user
sees every problem of a job file at once, each named by its dotted path.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    Discriminator,
    Field,
    PositiveFloat,
    PositiveInt,
    PrivateAttr,
    Tag,
    ValidationError,
    model_validator,
)

from moe_ray.config import BalanceConfig, ModelConfig, Strict, TrainConfig
from moe_ray.secrets import looks_secret_key, redact, secret_value_kind


class DataConfig(Strict):
    # "builtin": the standard-library corpus; a prepared dataset (`moe-ray prepare`); otherwise
    # raw text: a local path or s3:// URI (file or folder), prepared into the run's folder on first use.
    source: str = "builtin"
    format: Literal["auto", "text", "jsonl", "parquet"] = "auto"
    text_field: str = "text"  # JSONL field / Parquet column holding the text
    # "bytes": byte-level tokens (vocab 256); otherwise a path or s3:// URI of a tokenizer.json.
    tokenizer: str = "bytes"
    val_every_nth_doc: PositiveInt = 20  # every n-th document goes to the validation split
    max_bytes: PositiveInt | None = None  # read at most this much raw text (default: all of it)


class WorkerRange(Strict):
    min: PositiveInt
    max: PositiveInt

    @model_validator(mode="after")
    def _order(self) -> WorkerRange:
        if self.min > self.max:
            raise ValueError(f"resources.workers.min={self.min} exceeds resources.workers.max={self.max}")
        return self


def _worker_form(value: Any) -> str:
    return "range" if isinstance(value, dict | WorkerRange) else "count"


# Validated as the form the input has, so a problem is told once, as that form's problem.
WorkerCount = Annotated[
    Annotated[PositiveInt, Tag("count")] | Annotated[WorkerRange, Tag("range")], Discriminator(_worker_form)
]


class ResourcesConfig(Strict):
    # A fixed count, or {min, max}: Ray Train's elastic mode grows and shrinks the group.
    workers: WorkerCount = 2
    # auto: one GPU per worker when the cluster has GPUs, else CPU workers.
    use_gpu: bool | Literal["auto"] = "auto"
    cpus_per_worker: float = Field(1.0, gt=0)
    # Expert-parallel group size; None = all workers (pure EP). Must divide the worker count.
    ep_size: PositiveInt | None = None
    # The dense parts (attention, embeddings, shared experts, routers, norms, MTP): "fsdp" shards
    # them and their optimizer state over all workers (FSDP2); "replicate" keeps a full copy on
    # every worker (one all-reduce per step: faster while the dense part is small); "auto": FSDP
    # once a replica's training state would reach 1 GiB (~67M dense parameters).
    dense_parallel: Literal["auto", "fsdp", "replicate"] = "auto"
    max_failures: int = Field(3, ge=-1)  # worker-group restarts from the last checkpoint; -1: no limit
    elastic_resize_interval_s: float = Field(60.0, gt=0)  # how often an elastic run looks for more nodes

    @property
    def max_workers(self) -> int:
        return self.workers.max if isinstance(self.workers, WorkerRange) else self.workers

    @property
    def min_workers(self) -> int:
        return self.workers.min if isinstance(self.workers, WorkerRange) else self.workers


class CheckpointSpec(Strict):
    # A local folder or s3://bucket/prefix. Runs are folders below it, named after the run.
    storage: str = "./runs"
    every: int = Field(100, ge=0)  # steps between checkpoints; 0 = only at the end
    keep: PositiveInt = 3  # newest complete checkpoints kept; older ones are pruned


class TrackingConfig(Strict):
    enabled: bool = True
    # An MLflow server URI. None: $MLFLOW_TRACKING_URI if set, else an SQLite store (mlflow.db)
    # in the working folder.
    uri: str | None = None
    experiment: str = "moe-ray"
    log_every: PositiveInt = 10  # steps between metric points
    heatmap_every: PositiveInt = 100  # steps between expert-load heatmap refreshes
    log_model: bool = False  # also upload the final checkpoint's files as the run's `model/` artifacts
    # How long a finished run waits for an unreachable server to take what is still queued.
    flush_timeout_s: PositiveFloat = 30.0


# One rule for job and run names, wherever they enter (job files, --run, moe-ray scale, the
# cluster's metadata): they become folder names, actor names and command-line arguments.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$"


def check_run_name(name: str, where: str = "--run") -> str:
    if not re.fullmatch(NAME_PATTERN, name):
        raise JobSpecError(
            where,
            [(where, f"{name!r} is not a valid run name: use letters, digits, '_', '.' and '-' (up to 100)")],
        )
    return name


class JobSpec(Strict):
    name: str = Field("moe-job", pattern=NAME_PATTERN)
    model: ModelConfig = Field(default_factory=ModelConfig)
    balance: BalanceConfig = Field(default_factory=BalanceConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    # Set by load_job: the values that came from the environment through ${VAR} (dotted path ->
    # the reference as written), and the credentials among them, masked in everything written.
    _env_refs: dict[str, str] = PrivateAttr(default_factory=dict)
    _credentials: set[str] = PrivateAttr(default_factory=set)

    @model_validator(mode="after")
    def _cross_checks(self) -> JobSpec:
        problems = cross_section_problems({name: getattr(self, name) for name in type(self).model_fields})
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def ep_size_for(self, world_size: int) -> int:
        return self.resources.ep_size or world_size


def cross_section_problems(sections: dict[str, Any]) -> list[str]:
    """Checks between sections. A section missing from `sections` (it did not validate on its
    own) skips the checks that need it, so the others still run and are reported together."""
    res, model, train, data = (sections.get(k) for k in ("resources", "model", "train", "data"))
    problems = []
    if res is not None:
        if isinstance(res.workers, WorkerRange) and res.ep_size:
            problems.append("resources.ep_size must be unset with a worker range: every worker count is then pure EP")
        elif res.ep_size and res.max_workers % res.ep_size:
            problems.append(f"resources.ep_size={res.ep_size} must divide resources.workers={res.max_workers}")
    if res is not None and model is not None and (res.ep_size or res.max_workers) > model.moe.n_routed_experts:
        problems.append(
            f"resources.workers={res.max_workers} exceeds model.moe.n_routed_experts={model.moe.n_routed_experts}: "
            "every expert-parallel worker must hold at least one expert (set resources.ep_size for DP)"
        )
    if res is not None and train is not None and train.batch_size < res.max_workers:
        problems.append(
            f"train.batch_size={train.batch_size} is smaller than resources.workers={res.max_workers}: "
            "every worker needs at least one sequence per step"
        )
    if train is not None and model is not None and train.seq_len > model.max_seq_len:
        problems.append(f"train.seq_len={train.seq_len} exceeds model.max_seq_len={model.max_seq_len}")
    if data is not None and model is not None and data.tokenizer == "bytes" and model.vocab_size < 256:
        problems.append(f"byte-level tokens need model.vocab_size >= 256, got {model.vocab_size}")
    return problems


def _valid_sections(data: dict[str, Any]) -> dict[str, Any]:
    """The job's sections that validate on their own (absent ones take their defaults)."""
    out = {}
    for name, field in JobSpec.model_fields.items():
        kind = field.annotation
        if not (isinstance(kind, type) and issubclass(kind, Strict)):
            continue
        try:
            if name in data:
                out[name] = kind.model_validate(data[name])
            else:
                out[name] = field.get_default(call_default_factory=True)
        except ValidationError:
            pass
    return out


class JobSpecError(Exception):
    """A job file that cannot be used; `problems` lists (dotted path, message) pairs."""

    def __init__(self, source: str, problems: list[tuple[str, str]]):
        self.source = source
        self.problems = problems
        lines = [f"{source}: {len(problems)} problem(s)"] + [f"  {p}: {m}" for p, m in problems]
        super().__init__("\n".join(lines))


def _problems_of_cross_checks(messages: list[str]) -> list[tuple[str, str]]:
    """One entry per cross-section problem, under the dotted path it starts with."""
    out = []
    for part in messages:
        m = re.match(r"^(?:the expert-parallel size \d+ must divide )?([a-z_]+(?:\.[a-z_]+)+)", part)
        out.append((m[1] if m else "(job)", part))
    return out


def _dotted_path(loc: tuple, data: Any, missing: bool) -> str:
    """An error's path as the job file spells it: pydantic's loc without the tags it adds for a
    member of a union or an after-validator (steps that are no key of the input)."""
    parts, node = [], data
    for i, step in enumerate(loc):
        if isinstance(node, dict) and step in node:
            node = node[step]
        elif isinstance(node, list) and isinstance(step, int) and 0 <= step < len(node):
            node = node[step]
        elif missing and i == len(loc) - 1:
            node = None  # the required key that is not there
        else:
            continue
        parts.append(str(step))
    return ".".join(parts) or "(job)"


def _problems(err: ValidationError, data: Any) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    at: dict[str, int] = {}  # path -> its entry in out
    for e in err.errors():
        path = _dotted_path(e["loc"], data, e["type"] == "missing")
        msg = e["msg"].removeprefix("Value error, ")
        if path == "(job)":
            out += _problems_of_cross_checks(msg.split("; "))
            continue
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see jobs/ for the allowed keys)"
        elif "input" in e and e["type"] not in ("missing",) and not isinstance(e["input"], dict):
            msg = f"{msg} (got {e['input']!r})"
        if path in at:  # each member of a union failed on the same value: one problem, "or" between
            out[at[path]] = (path, f"{out[at[path]][1]}; or {msg}")
        else:
            at[path] = len(out)
            out.append((path, msg))
    return out


def parse_job(data: dict[str, Any], source: str = "job") -> JobSpec:
    if not isinstance(data, dict):
        raise JobSpecError(source, [("(job)", "a job file must be a YAML mapping of sections")])
    try:
        return JobSpec.model_validate(data)
    except ValidationError as err:
        problems = _problems(err, data)
        if any(e["loc"] for e in err.errors()):  # a section failed, so the job-level checks never ran
            problems += _problems_of_cross_checks(cross_section_problems(_valid_sections(data)))
        raise JobSpecError(source, problems) from None


def apply_overrides(data: dict, overrides: list[str], source: str = "--set") -> dict:
    """`key.sub=value` overrides; the value is read as YAML (so 8, 1e-3, true, [1, 2] work)."""
    problems = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            problems.append((item, "an override must look like key.sub=value"))
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part, {}), dict):
                problems.append((key, f"{part} is not a section"))
                break
            node = node.setdefault(part, {})
        else:
            node[parts[-1]] = value
    if problems:
        raise JobSpecError(source, problems)
    return data


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def interpolate_env(data, path: str = "", refs: dict | None = None, credentials: set | None = None):
    """Replace ${VAR} and ${VAR:-default} in string values from the environment. `refs` collects
    {dotted path: the value as written} of every value that had a reference; `credentials` the
    values of variables whose names say they are credentials (MLFLOW_PASSWORD, HF_TOKEN, ...)."""
    problems: list[tuple[str, str]] = []
    refs = {} if refs is None else refs
    credentials = set() if credentials is None else credentials
    if isinstance(data, dict):
        out = {}
        for k, v in data.items():
            out[k], p = interpolate_env(v, f"{path}.{k}" if path else str(k), refs, credentials)
            problems += p
        return out, problems
    if isinstance(data, list):
        items = [interpolate_env(v, f"{path}[{i}]", refs, credentials) for i, v in enumerate(data)]
        return [v for v, _ in items], [p for _, ps in items for p in ps]
    if isinstance(data, str) and "${" in data:
        refs[path] = data

        def sub(m):
            value = os.environ.get(m[1], m[2])
            if value and looks_secret_key(m[1]):
                credentials.add(value)
            if value is None:
                problems.append(
                    (path, f"environment variable {m[1]} is not set (or give a default: ${{{m[1]}:-value}})")
                )
                return m[0]
            return value

        whole = _ENV_REF.fullmatch(data)
        value = _ENV_REF.sub(sub, data)
        # A value that is one reference alone is read as YAML, so ${WORKERS} can be a number.
        if whole and not problems:
            try:
                return yaml.safe_load(value), problems
            except yaml.YAMLError:
                return value, problems
        return value, problems
    return data, problems


def find_secrets(data, path: str = "") -> list[tuple[str, str]]:
    """Keys or values that look like credentials: those belong in the environment."""
    found = []
    if isinstance(data, dict):
        for k, v in data.items():
            sub = f"{path}.{k}" if path else str(k)
            if looks_secret_key(str(k)):
                found.append(
                    (
                        sub,
                        "looks like a secret: never put credentials in a job file; set them in the "
                        "environment (e.g. AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, RAY_AUTH_TOKEN)",
                    )
                )
            else:
                found += find_secrets(v, sub)
    elif isinstance(data, list):
        for i, v in enumerate(data):
            found += find_secrets(v, f"{path}[{i}]")
    elif isinstance(data, str) and (kind := secret_value_kind(data)):
        found.append(
            (
                path,
                f"contains what looks like {kind}: set credentials in the environment "
                "(AWS_* for S3, MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD for MLflow)",
            )
        )
    return found


def load_job(path: str | Path, overrides: list[str] | None = None) -> JobSpec:
    path = Path(path)
    if not path.is_file():
        raise JobSpecError(str(path), [("(file)", "no such job file")])
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise JobSpecError(str(path), [("(yaml)", str(err))]) from None
    if data is None:
        raise JobSpecError(str(path), [("(job)", "the job file is empty: start from jobs/quickstart.yaml")])
    if not isinstance(data, dict):
        raise JobSpecError(str(path), [("(job)", "a job file must be a YAML mapping of sections")])
    # Secrets are looked for before interpolation: a ${VAR} reference in the file is fine.
    problems = find_secrets(data)
    refs: dict[str, str] = {}
    credentials: set[str] = set()
    data, env_problems = interpolate_env(apply_overrides(data, overrides or []), refs=refs, credentials=credentials)
    problems += env_problems
    secret_paths = {p for p, _ in problems}
    try:
        job = parse_job(data, str(path))
    except JobSpecError as err:  # report schema problems too: every problem at once
        problems += [(p, m) for p, m in err.problems if p not in secret_paths]
    if problems:
        raise JobSpecError(str(path), problems)
    job._env_refs, job._credentials = refs, credentials
    return job


def mask(text: str, job: JobSpec) -> str:
    """`text` with every credential the job holds masked: URL passwords and AWS key ids, and the
    values of credential-named variables it took through ${VAR}."""
    for secret in sorted(job._credentials, key=len, reverse=True):
        text = text.replace(secret, "***")
    return redact(text)


def local_relative(path: str | None) -> bool:
    """A path on this machine that is not absolute: another process reads it against its own
    working directory (Ray's workers and tasks: on a cluster, where `ray start` ran)."""
    return bool(path) and "://" not in path and not Path(path).expanduser().is_absolute()


def absolute_path(path: str) -> str:
    """`path` anchored at this process's working directory (and `~` at this user's home), as the
    user meant it; URIs unchanged."""
    return path if "://" in path else os.path.abspath(os.path.expanduser(path))


def data_with_absolute_paths(data: DataConfig) -> DataConfig:
    keep = {"source": "builtin", "tokenizer": "bytes"}  # names, not paths
    return data.model_copy(update={k: absolute_path(v) for k, v in data if k in keep and v != keep[k]})


def with_absolute_paths(job: JobSpec) -> JobSpec:
    """The job with every local path absolute, before it reaches a Ray worker or task."""
    model = job.model
    if model.init_from:
        model = model.model_copy(update={"init_from": absolute_path(model.init_from)})
    checkpoint = job.checkpoint.model_copy(update={"storage": absolute_path(job.checkpoint.storage)})
    return job.model_copy(update={"model": model, "data": data_with_absolute_paths(job.data), "checkpoint": checkpoint})


def dump_job(job: JobSpec) -> str:
    """The resolved job as YAML, credentials masked: what may be printed or written anywhere."""
    return mask(yaml.safe_dump(job.model_dump(mode="json"), sort_keys=False), job)


def job_record(job: JobSpec) -> dict:
    """The resolved job as a dict, credentials masked: for checkpoints and tracking params."""
    return yaml.safe_load(dump_job(job))


def dump_job_for_cluster(job: JobSpec) -> str:
    """The job file a submitted run reads on the cluster: a value that came through ${VAR} and
    holds a credential is written as its ${VAR} reference again, so the cluster resolves it from
    its own environment and the credential never lands in the job's working directory."""
    data = job.model_dump(mode="json")
    for dotted, written in job._env_refs.items():
        node, *parts = [data, *dotted.split(".")]
        for part in parts[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        leaf = parts[-1]
        if isinstance(node, dict) and leaf in node and mask(str(node[leaf]), job) != str(node[leaf]):
            node[leaf] = written
    return mask(yaml.safe_dump(data, sort_keys=False), job)


_RUN_NAME = re.compile(r"[^A-Za-z0-9_.-]+")


def default_run_name(job: JobSpec) -> str:
    import time

    return _RUN_NAME.sub("-", f"{job.name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid() % 1000:03d}")
