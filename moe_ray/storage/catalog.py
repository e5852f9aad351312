"""Listing a run's checkpoints (local folder or S3) and pruning old ones."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass

from moe_ray.storage import s3
from moe_ray.storage.checkpoint_index import INDEX, CheckpointError
from moe_ray.storage.location import Location

CHECKPOINT_DIR = re.compile(r"^step-(\d{8})$")


def checkpoint_dir_name(step: int) -> str:
    return f"step-{step:08d}"


@dataclass
class CheckpointInfo:
    name: str
    step: int
    size: int  # bytes
    complete: bool  # has an index listing every file it holds, with matching sizes
    location: Location


def run_location(storage: str, run_name: str) -> Location:
    return Location(storage).child(run_name)


def run_name_problem(storage: str, run_name: str, resume: bool) -> str | None:
    """Why the named run cannot be started (it holds checkpoints, which Ray Train would quietly
    continue) or resumed (it holds none); None when it can."""
    run = run_location(storage, run_name)
    held = bool(list_checkpoints(run))
    if held and not resume:
        return (
            f"--run {run_name}: {run} already holds that run's checkpoints: continue it with --resume "
            f"--run {run_name}, or give a new name"
        )
    if resume and not held:
        return f"--resume --run {run_name}: no checkpoints under {run}{runs_there(storage)}"
    return None


def runs_there(storage: str, most: int = 10) -> str:
    """A hint for a run name that holds nothing: " (runs in STORAGE: a, b, ...)", the names of
    the folders there, or " (STORAGE holds no runs)"."""
    loc = Location(storage)
    if loc.is_s3:
        names = s3.list_children(loc)
    else:
        names = sorted(p.name for p in loc.local_path.iterdir() if p.is_dir()) if loc.local_path.is_dir() else []
    if not names:
        return f" ({storage} holds no runs)"
    more = f", and {len(names) - most} more" if len(names) > most else ""
    return f" (runs in {storage}: {', '.join(names[-most:])}{more})"


def list_checkpoints(run: Location) -> list[CheckpointInfo]:
    """The run's checkpoints, oldest first."""
    files: dict[str, dict[str, int]] = {}
    if run.is_s3:
        base = run.prefix + "/"
        for obj in s3.list_objects(run):
            rel = obj["Key"][len(base) :]
            if "/" in rel:
                folder, name = rel.split("/", 1)
                files.setdefault(folder, {})[name] = obj["Size"]
        read_index = lambda folder: json.loads(s3.read_bytes(run.child(folder, INDEX)))  # noqa: E731
    else:
        root = run.local_path
        if not root.is_dir():
            return []
        for folder in root.iterdir():
            if folder.is_dir():
                files[folder.name] = {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()}
        read_index = lambda folder: json.loads((root / folder / INDEX).read_text())  # noqa: E731
    out = []
    for folder, names in files.items():
        m = CHECKPOINT_DIR.match(folder)
        if not m:
            continue
        complete = False
        if INDEX in names:
            try:
                index = read_index(folder)
                complete = all(names.get(e["name"]) == e["size"] for e in index["files"])
            except (ValueError, KeyError, OSError):
                complete = False
        out.append(CheckpointInfo(folder, int(m[1]), sum(names.values()), complete, run.child(folder)))
    return sorted(out, key=lambda c: c.step)


def delete_checkpoint(info: CheckpointInfo) -> None:
    if info.location.is_s3:
        s3.delete_prefix(info.location)
    else:
        shutil.rmtree(info.location.local_path)


def prune(run: Location, keep: int) -> list[CheckpointInfo]:
    """Delete all but the newest `keep` complete checkpoints, and incomplete ones older than
    the newest complete one. Never deletes the newest complete checkpoint."""
    ckpts = list_checkpoints(run)
    complete = [c for c in ckpts if c.complete]
    keep_names = {c.name for c in complete[-keep:]} if keep > 0 else set()
    newest = complete[-1].step if complete else -1
    doomed = [c for c in ckpts if c.name not in keep_names and (c.complete or c.step < newest)]
    if complete:
        doomed = [c for c in doomed if c.name != complete[-1].name]
    for c in doomed:
        delete_checkpoint(c)
    return doomed


def resolve_checkpoint(uri: str) -> str:
    """The checkpoint that `uri` names: `uri` itself when it holds an index, and for a run's folder
    (checkpoint.storage/RUN_NAME) its newest complete checkpoint, so that nothing downloads a
    whole run to find one."""
    loc = Location(uri)
    if s3.exists(loc.child(INDEX)) if loc.is_s3 else (loc.local_path / INDEX).is_file():
        return uri
    ckpts = list_checkpoints(loc)
    complete = [c for c in ckpts if c.complete]
    if complete:
        return str(complete[-1].location)
    if ckpts:
        raise CheckpointError(
            f"{uri} is a run folder whose checkpoints are all incomplete ({', '.join(c.name for c in ckpts)}): "
            "none can be loaded"
        )
    if s3.exists(loc.child("config.json")) if loc.is_s3 else (loc.local_path / "config.json").is_file():
        raise CheckpointError(
            f"{uri} is a Hugging Face model folder, not a moe-ray checkpoint: load it with transformers or "
            "vLLM, or train from it with model.init_from"
        )
    raise CheckpointError(
        f"{uri} is not a checkpoint folder (no {INDEX}) nor a run folder holding step-NNNNNNNN checkpoints: "
        "pass checkpoint.storage/RUN_NAME/step-NNNNNNNN, or the run folder for its newest checkpoint"
    )
