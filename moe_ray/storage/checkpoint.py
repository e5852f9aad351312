"""The checkpoint format (DESIGN 5.4, 5.5): keyed by GLOBAL expert id, so a checkpoint written
by W workers loads into any W' workers with a new placement, bit-exact for every expert.

A checkpoint is one folder:
  experts-<first>-<last>.safetensors  routed experts of one EP rank: weights and AdamW state,
                                      tensors named moe.<layer>.expert.<global id>.<w13|w2>[.<state>]
  dense.safetensors                   everything else (incl. every router's bias b) + its AdamW state
  state.json                          step, data position, world layout, job, RNG
  index.json                          every file above with its size and sha256, written last

Only safetensors and JSON are read back: no pickle from storage.
"""

from __future__ import annotations

import contextlib
import json
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from moe_ray.model.transformer import MoETransformer
from moe_ray.parallel.dtensor import is_dtensor
from moe_ray.storage.checkpoint_index import (
    FORMAT,
    INDEX,
    STATE,
    CheckpointError,
    check_sizes,
    local_sizes,
    read_index,
    sha256_file,
    verify,
)
from moe_ray.storage.location import Location

DENSE = "dense.safetensors"
ADAM_STATE = ("exp_avg", "exp_avg_sq")
_EXPERT_FILE = re.compile(r"^experts-(\d+)-(\d+)\.safetensors$")
_EXPERT_KEY = re.compile(r"^moe\.(\d+)\.expert\.(\d+)\.(w13|w2)(?:\.(exp_avg|exp_avg_sq))?$")


@dataclass
class TrainingState:
    step: int  # the next step to run
    extra: dict  # everything else of state.json


def file_entry(path: Path) -> dict:
    """A file's index entry; an expert file's also lists the global ids it holds per layer (from
    its metadata), so a reader picks exactly the files it needs whatever the placement."""
    entry = {"name": path.name, "size": path.stat().st_size, "sha256": sha256_file(path)}
    if _EXPERT_FILE.match(path.name):
        with safe_open(str(path), framework="pt") as f:
            held = (f.metadata() or {}).get("experts")
        if held:
            entry["experts"] = json.loads(held)
    return entry


def _expert_modules(model: MoETransformer):
    return [layer.experts for layer in model.moe_layers()]


def _dense_named_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if ".experts." not in n}


def full_cpu(t: torch.Tensor) -> torch.Tensor:
    """A CPU copy of the whole of `t`. For an FSDP shard (DTensor) this gathers it from its mesh:
    a collective, so every rank of that mesh must call it, in the same order."""
    whole = t.full_tensor() if is_dtensor(t) else t
    return whole.detach().to("cpu", copy=True)


def shaped_like(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """`full` laid out as `param` is: this rank's shard of it for a DTensor (cut locally, no
    communication), else `full` itself on param's device and dtype."""
    full = full.to(param.device, param.dtype)
    if is_dtensor(param):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
    return full


@torch.no_grad()
def assign(dst: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a whole tensor into `dst`, which may be this rank's shard of it."""
    if is_dtensor(dst):
        dst.to_local().copy_(shaped_like(dst, full).to_local())
    else:
        dst.copy_(full)


def expert_tensors(model: MoETransformer, optimizer: torch.optim.Optimizer, keep: bool = True) -> dict:
    """This rank's routed experts on the CPU, one tensor per (layer, global expert, weight[, Adam
    state]). Every rank calls it (gathering FSDP-sharded experts is collective); `keep=False`
    returns nothing (a rank whose experts another rank writes)."""
    tensors = {}
    for layer, ex in enumerate(_expert_modules(model)):
        for name in ("w13", "w2"):
            param = getattr(ex, name)
            state = optimizer.state.get(param, {})
            parts = {None: full_cpu(param)} | {s: full_cpu(state[s]) for s in ADAM_STATE if s in state}
            if not keep:
                continue
            for i, expert in enumerate(ex.expert_ids):
                key = f"moe.{layer}.expert.{expert}.{name}"
                for s, whole in parts.items():
                    tensors[key if s is None else f"{key}.{s}"] = whole[i].clone()
    return tensors


def write_experts(folder: Path, model: MoETransformer, tensors: dict) -> Path:
    """The file of this rank's experts (from `expert_tensors`), named by the lowest and highest
    global id it holds of the first MoE layer (unique: the writing ranks hold disjoint sets, so
    their lowest ids differ); its metadata lists every layer's ids."""
    experts = _expert_modules(model)
    ids = experts[0].expert_ids if experts else (0,)
    first, last = min(ids), max(ids)
    path = folder / f"experts-{first:05d}-{last:05d}.safetensors"
    save_file(tensors, str(path), metadata={"experts": json.dumps([list(ex.expert_ids) for ex in experts])})
    return path


def dense_tensors(model: MoETransformer, optimizer: torch.optim.Optimizer, keep: bool = True) -> dict:
    """Dense weights, buffers (every router's bias) and their AdamW state, whole, on the CPU. Every
    rank calls it (gathering FSDP shards is collective); `keep=False` returns nothing."""
    tensors = {}
    params = _dense_named_parameters(model)
    for name, t in model.state_dict().items():
        if ".experts." not in name:
            whole = full_cpu(t)
            if keep:
                tensors[f"model.{name}"] = whole
    for name, p in params.items():
        for s in ADAM_STATE:
            if s in optimizer.state.get(p, {}):
                whole = full_cpu(optimizer.state[p][s])
                if keep:
                    tensors[f"optim.{name}.{s}"] = whole
    return tensors


def write_dense(folder: Path, tensors: dict, state: dict) -> list[Path]:
    """dense.safetensors (from `dense_tensors`, plus the RNG state) and state.json."""
    save_file(tensors | {"rng.torch": torch.get_rng_state()}, str(folder / DENSE))
    (folder / STATE).write_text(json.dumps({"format": FORMAT, **state}, indent=2, sort_keys=True))
    return [folder / DENSE, folder / STATE]


def _set_adam_state(optimizer, param, step: int, values: dict[str, torch.Tensor]) -> None:
    """Whole AdamW moments of `param` into the optimizer, laid out (sharded) as `param` is."""
    if not values:
        return
    state = optimizer.state[param]
    # Where AdamW keeps it: the fused kernel wants the step on the parameter's device.
    state["step"] = torch.tensor(float(step), device=param.device)
    for s, v in values.items():
        state[s] = shaped_like(param, v)


def files_needed(index: dict, model: MoETransformer) -> list[str]:
    """The files a model reads: dense and training state, and the expert files holding an expert
    the model holds in some layer (by the ids the index lists; for a checkpoint written before
    the index listed them, by the id range in the file name)."""
    experts = _expert_modules(model)
    wanted = [DENSE, STATE]
    for entry in sorted(index["files"], key=lambda e: e["name"]):
        m = _EXPERT_FILE.match(entry["name"])
        if not m:
            continue
        if "experts" in entry:
            needed = any(set(ids) & set(ex.expert_ids) for ids, ex in zip(entry["experts"], experts, strict=False))
        else:
            needed = any(int(m[1]) <= e <= int(m[2]) for ex in experts for e in ex.expert_ids)
        if needed:
            wanted.append(entry["name"])
    return wanted


def load(
    folder: Path,
    model: MoETransformer,
    optimizer: torch.optim.Optimizer | None,
    sizes: dict[str, int | None] | None = None,
) -> TrainingState:
    """Load a verified checkpoint into `model` (any expert placement) and `optimizer`. `folder`
    needs only `files_needed`; `sizes` (from `fetch`) are the stored files' sizes."""
    folder = Path(folder)
    index = read_index(folder)
    experts = _expert_modules(model)
    needed = files_needed(index, model)
    verify(folder, hash_files=set(needed), sizes=sizes)
    state = json.loads((folder / STATE).read_text())
    step = int(state["step"])

    with safe_open(str(folder / DENSE), framework="pt") as f:
        keys = set(f.keys())
        model_keys = {k[len("model.") :] for k in keys if k.startswith("model.")}
        expected = {n for n in model.state_dict() if ".experts." not in n}
        if model_keys != expected:
            missing, unexpected = sorted(expected - model_keys), sorted(model_keys - expected)
            raise CheckpointError(
                f"{folder} is for another model shape (missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        own = model.state_dict()  # FSDP: this rank's shards (DTensors), with the whole shapes
        for name in expected:
            t = f.get_tensor(f"model.{name}")
            if t.shape != own[name].shape:
                raise CheckpointError(
                    f"{folder}: {name} has shape {tuple(t.shape)}, model has {tuple(own[name].shape)}"
                )
            assign(own[name], t)
        if optimizer is not None:
            for name, p in _dense_named_parameters(model).items():
                vals = {s: f.get_tensor(f"optim.{name}.{s}") for s in ADAM_STATE if f"optim.{name}.{s}" in keys}
                _set_adam_state(optimizer, p, step, vals)

    # Whole expert blocks are assembled here, then placed into the (possibly sharded) parameters
    # and optimizer state in one go.
    blocks: dict[tuple[int, str, str | None], torch.Tensor] = {}
    found: dict[tuple[int, int], int] = {}
    for name in (n for n in needed if n not in (DENSE, STATE)):
        with safe_open(str(folder / name), framework="pt") as f:
            for key in f.keys():
                m = _EXPERT_KEY.match(key)
                if not m:
                    continue
                layer, expert, weight, adam = int(m[1]), int(m[2]), m[3], m[4]
                if layer >= len(experts):
                    raise CheckpointError(f"{folder}: expert layer {layer} does not exist in this model")
                ex = experts[layer]
                i = ex.local_index.get(expert)
                if i is None or (adam is not None and optimizer is None):
                    continue
                param = getattr(ex, weight)
                block = blocks.get((layer, weight, adam))
                if block is None:
                    block = blocks[(layer, weight, adam)] = torch.zeros(param.shape, dtype=param.dtype)
                block[i] = f.get_tensor(key)
                if adam is None:
                    found[(layer, expert)] = found.get((layer, expert), 0) + 1
    for layer, ex in enumerate(experts):
        for expert in ex.expert_ids:
            if found.get((layer, expert)) != 2:
                raise CheckpointError(f"{folder}: no weights for layer {layer} expert {expert}")
    for (layer, weight, adam), block in blocks.items():
        param = getattr(experts[layer], weight)
        if adam is None:
            assign(param, block)
        else:
            _set_adam_state(optimizer, param, step, {adam: block})
    return TrainingState(step=step, extra=state)


@contextlib.contextmanager
def local_checkpoint(uri: str) -> Iterator[Path]:
    """A local folder holding the checkpoint at `uri` (a folder, or s3://... downloaded)."""
    loc = Location(uri)
    if not loc.is_s3:
        if not (loc.local_path / INDEX).is_file():
            raise CheckpointError(f"{uri} is not a checkpoint folder (no {INDEX})")
        yield loc.local_path
        return
    from pyarrow.fs import copy_files

    path, fs = loc.ray_storage()
    with tempfile.TemporaryDirectory(prefix="moe-ray-ckpt-") as tmp:
        copy_files(path, tmp, source_filesystem=fs)
        yield Path(tmp)


@contextlib.contextmanager
def fetch(path: str, filesystem, model: MoETransformer) -> Iterator[tuple[Path, dict[str, int | None]]]:
    """(a local folder with the files `model` needs of the checkpoint at `path` on a pyarrow
    `filesystem`, the stored size of every indexed file). A local checkpoint is read in place; a
    remote one is only partly downloaded: a worker fetches its own experts' files, not all."""
    from pyarrow import fs as pafs

    if isinstance(filesystem, pafs.LocalFileSystem):
        index = read_index(Path(path))
        yield Path(path), local_sizes(Path(path), index)
        return
    with tempfile.TemporaryDirectory(prefix="moe-ray-ckpt-") as tmp:
        dest = Path(tmp)
        try:
            pafs.copy_files(f"{path}/{INDEX}", str(dest / INDEX), source_filesystem=filesystem)
        except (OSError, FileNotFoundError):
            raise CheckpointError(f"{path} has no {INDEX}: the checkpoint was never completed") from None
        index = read_index(dest)
        infos = filesystem.get_file_info([f"{path}/{e['name']}" for e in index["files"]])
        sizes = {
            e["name"]: info.size if info.type == pafs.FileType.File else None
            for e, info in zip(index["files"], infos, strict=True)
        }
        check_sizes(path, index, sizes)  # before downloading anything large
        for name in files_needed(index, model):
            pafs.copy_files(f"{path}/{name}", str(dest / name), source_filesystem=filesystem)
        yield dest, sizes


def load_rng(folder: Path) -> torch.Tensor:
    with safe_open(str(Path(folder) / DENSE), framework="pt") as f:
        return f.get_tensor("rng.torch")
