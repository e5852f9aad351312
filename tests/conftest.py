"""Shared fixtures: a real local Ray per test module, and small jobs."""

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from moe_ray.spec import JobSpec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "infra" / "local"))
from stack import LocalStack, free_port  # noqa: E402,F401

# Keep the test processes from oversubscribing a small machine.
torch.set_num_threads(min(2, os.cpu_count() or 1))
# Ray Train starts a PreemptionWatcher actor per worker group (a process that imports Ray Train:
# ~2.5 s of CPU, ~1.2 s of a start here) to tell a training function of node drains, which moe-ray
# does not ask for. Off in the tests, but for the runs that show what a user sees (the quickstart
# job, the real head of test_submit, where moe-ray hides the watcher's ERROR line).
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
# A Ray node starts 2 idle workers for its first driver: of no use to the tests' drivers, whose
# runtime_env their tasks and actors need (~1.2 s of CPU per node started, then ~1 s a minute).
os.environ.setdefault("RAY_prestart_worker_first_driver", "0")


def with_preemption_watcher(env: dict) -> dict:
    """`env` without the tests' setting that leaves out Ray Train's PreemptionWatcher."""
    return {k: v for k, v in env.items() if k != "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"}


class SharedRayNode:
    """One local Ray node for the modules that ask for `local_ray` (each start and shutdown of one
    costs ~10 s of a 2-core machine's CPU), started by the first of them. Those modules run one
    after another (pytest_collection_modifyitems below), and the node stops after the last, before
    any other Ray starts: with two on one machine, Ray's address discovery fails (Ray Train's
    placement-group cleaner on test_submit's head asks it, and raises). Modules that need a Ray of
    another shape (several nodes, a `ray start` head, a fresh embedded one) start their own."""

    def __init__(self):
        self.cluster = None

    def address(self) -> str:
        if self.cluster is None:
            from ray._private.authentication.authentication_token_setup import ensure_token_if_auth_enabled
            from ray.cluster_utils import Cluster

            from moe_ray.runtime.cluster import enable_token_auth

            # Token authentication, as for a run's own local Ray (Ray's default for a new local
            # Ray), from here on in this process: each module's driver must use the node's mode
            # (ray.init turns this process's mode to token where it finds a token; a driver in
            # another mode than its node loses its actors as they are created). A token is made
            # where this machine has none, as ray.init does.
            enable_token_auth(local=True)
            ensure_token_if_auth_enabled()
            self.cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, "include_dashboard": False})
        return self.cluster.address

    def stop(self) -> None:
        if self.cluster is not None:
            import ray

            if ray.is_initialized():
                ray.shutdown()
            self.cluster.shutdown()
            self.cluster = None


_ray_node = SharedRayNode()
_modules_on_the_node: set[str] = set()


def _module(item) -> str:
    return item.nodeid.split("::")[0]


@pytest.hookimpl(trylast=True)  # on the items left after -k and -m
def pytest_collection_modifyitems(items):
    """The modules on the shared Ray node run together, where the first of them would."""
    _modules_on_the_node.clear()
    _modules_on_the_node.update(_module(i) for i in items if "local_ray" in i.fixturenames)
    first = next((n for n, i in enumerate(items) if _module(i) in _modules_on_the_node), len(items))
    rest = items[first:]
    items[first:] = [i for i in rest if _module(i) in _modules_on_the_node] + [
        i for i in rest if _module(i) not in _modules_on_the_node
    ]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    """After the last module on the shared node (its driver gone), the node stops."""
    try:
        return (yield)
    finally:
        if nextitem is None or _module(nextitem) not in _modules_on_the_node:
            _ray_node.stop()


def pytest_sessionfinish():
    _ray_node.stop()  # also after an interrupt


@pytest.fixture(scope="module")
def local_ray():
    """A driver of the module's own on the shared node: its actors and worker groups end with it.
    Its workers get the AWS variables as they are when it connects (a module's S3 server is set
    up first), since the node keeps the environment of its start."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    env_vars = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", **{k: v for k, v in os.environ.items() if k.startswith("AWS_")}}
    ray.init(address=_ray_node.address(), log_to_driver=False, runtime_env={"env_vars": env_vars})
    yield ray
    ray.shutdown()


def cli_then_loaded(commands: list[list[str]], exit_code: int, packages: tuple[str, ...]):
    """Run each of `commands` through moe-ray's CLI in one fresh Python process (each must exit
    with `exit_code`); the process then exits naming the modules of `packages` it has loaded,
    or with 0 when none. What a command imports is what it costs before it does anything."""
    code = (
        "import sys\n"
        "from moe_ray.cli import app\n"
        f"for args in {commands!r}:\n"
        "    try:\n"
        "        app(args)\n"
        "    except SystemExit as stop:\n"
        f"        assert (stop.code or 0) == {exit_code}, (args, stop.code)\n"
        f"loaded = sorted(m for m in sys.modules if any(m == p or m.startswith(p + '.') for p in {packages!r}))\n"
        "sys.exit(f'imported: {loaded[:20]}' if loaded else 0)\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def _tracking_folder(storage) -> Path:
    """Local storage holds its runs' MLflow store; S3 storage gets a temporary folder (a Path of
    "s3://b/runs" would be ./s3:/b/runs, inside the checkout)."""
    if "://" in str(storage):
        folder = tempfile.mkdtemp(prefix="moe-ray-test-mlflow-")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)  # not left in /tmp run after run
        return Path(folder)
    return Path(storage).resolve()


REPLICATED = {"resources__dense_parallel": "replicate"}


def tiny_job(storage, **overrides) -> JobSpec:
    """A job small enough for a test: 3 layers (1 dense), 8 experts, top-2, MTP depth 1."""
    spec = {
        "name": "t",
        "model": {
            "vocab_size": 256,
            "d_model": 32,
            "n_heads": 2,
            "n_layers": 3,
            "n_dense_layers": 1,
            "max_seq_len": 64,
            "moe": {"n_routed_experts": 8, "expert_hidden": 16, "top_k": 2},
            "mtp": {"depth": 1},
        },
        "balance": {"bias_update_speed": 0.01, "seq_aux_alpha": 1e-3},
        "data": {"max_bytes": 2_000_000},
        "train": {
            "steps": 5,
            "batch_size": 8,
            "seq_len": 32,
            "warmup_steps": 2,
            "eval_every": 0,
            "eval_batches": 1,
            "log_every": 1,
            "lr": 1e-2,
        },
        # FSDP explicitly: "auto" would replicate a model this small, and the runtime tests must
        # cover the sharded layout (tests/test_parallel.py checks both against one process).
        # Modules whose runs test something else pass REPLICATED: an FSDP worker imports and sets
        # up FSDP (~2 s of CPU each here), which the replicated layout does without.
        "resources": {"workers": 2, "cpus_per_worker": 1, "dense_parallel": "fsdp"},
        "checkpoint": {"storage": str(storage), "every": 0, "keep": 5},
        # Beside the runs, not in the working folder: tests never write into the checkout.
        "tracking": {"uri": f"sqlite:///{_tracking_folder(storage) / 'mlflow.db'}"},
    }
    for dotted, value in overrides.items():
        node = spec
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return JobSpec.model_validate(spec)


def single_process_trainer(job: JobSpec):
    """The single-process Trainer of `job` on the CPU, over the built-in corpus it samples: the
    reference that runs on Ray are held to."""
    from moe_ray.data import builtin_corpus
    from moe_ray.train.trainer import Trainer

    return Trainer(job.model, job.balance, job.train, builtin_corpus(job.data.max_bytes), torch.device("cpu"))


def builtin_batch_digests(job: JobSpec, steps) -> list:
    """The digest of each listed step's global batch, sampled from the built-in corpus as a run
    of `job` samples it (what `train.audit_data` records), computed here without Ray."""
    from moe_ray.data import batch_digest, builtin_corpus, sample_windows, window_length

    data = builtin_corpus(job.data.max_bytes)
    window = window_length(job.train.seq_len, job.model.mtp.depth)
    return [batch_digest(sample_windows(data.train, window, job.train.seed, s, 0, job.train.batch_size)) for s in steps]


def copy_checkpoint_as_new_run(storage, run_name, checkpoint_name, new_run):
    """A new run whose only checkpoint is `checkpoint_name` of `run_name` (local storage)."""
    dst = storage / new_run / checkpoint_name
    shutil.copytree(storage / run_name / checkpoint_name, dst)
    return new_run


@pytest.fixture(scope="module")
def s3_stack(tmp_path_factory):
    """moto's S3 server over HTTP with a bucket, its endpoint and test credentials in os.environ
    (set before any Ray of the module starts, so Ray's workers reach it too)."""
    stack = LocalStack(tmp_path_factory.mktemp("s3"), bucket="moe-ray-test", mlflow=False).start()
    saved = {k: os.environ.get(k) for k in stack.env()}
    os.environ.update(stack.env())
    yield stack
    stack.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def mlflow_stack(tmp_path_factory):
    """A real `mlflow server` (SQLite backend) on 127.0.0.1."""
    stack = LocalStack(tmp_path_factory.mktemp("mlflow"), s3=False).start()
    yield stack
    stack.stop()


def write_checkpoint(folder, job, model=None):
    """A real checkpoint of one process's model, as the workers write it: `model` as it is, or a
    fresh one of `job` after one training step."""
    from moe_ray.storage import checkpoint as ckpt
    from moe_ray.storage.checkpoint_index import write_index
    from moe_ray.train.optim import build_optimizer
    from moe_ray.train.trainer import build_model

    opt = None
    if model is None:
        model = build_model(job.model, job.balance, 0, torch.device("cpu"))
        opt = build_optimizer(model, job.train)
        model.compute_loss(torch.randint(0, 256, (2, 34))).loss.backward()
        opt.step()
    opt = opt or build_optimizer(model, job.train)
    folder.mkdir(parents=True)
    files = [ckpt.write_experts(folder, model, ckpt.expert_tensors(model, opt))]
    state = {"step": 1, "job": job.model_dump(mode="json")}
    files += ckpt.write_dense(folder, ckpt.dense_tensors(model, opt), state)
    write_index(folder, [ckpt.file_entry(f) for f in files], 1)
    return folder
