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
import hashlib
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
from moe_ray.storage.location import Location

FORMAT = 1
INDEX = "index.json"
STATE = "state.json"
DENSE = "dense.safetensors"
ADAM_STATE = ("exp_avg", "exp_avg_sq")
_EXPERT_KEY = re.compile(r"^moe\.(\d+)\.expert\.(\d+)\.(w13|w2)(?:\.(exp_avg|exp_avg_sq))?$")


class CheckpointError(Exception):
    """A checkpoint that must not be trusted (incomplete, altered, or of another model)."""


@dataclass
class TrainingState:
    step: int  # the next step to run
    extra: dict  # everything else of state.json


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_entry(path: Path) -> dict:
    return {"name": path.name, "size": path.stat().st_size, "sha256": sha256_file(path)}


def _expert_modules(model: MoETransformer):
    return [layer.experts for layer in model.moe_layers()]


def _dense_named_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if ".experts." not in n}


def write_experts(folder: Path, model: MoETransformer, optimizer: torch.optim.Optimizer) -> Path:
    """This rank's routed experts, one tensor per (layer, global expert, weight[, Adam state])."""
    tensors = {}
    experts = _expert_modules(model)
    for layer, ex in enumerate(experts):
        for name in ("w13", "w2"):
            param = getattr(ex, name)
            state = optimizer.state.get(param, {})
            for i in range(ex.n_experts):
                key = f"moe.{layer}.expert.{ex.first_expert + i}.{name}"
                tensors[key] = param.detach()[i].cpu().clone()
                for s in ADAM_STATE:
                    if s in state:
                        tensors[f"{key}.{s}"] = state[s][i].cpu().clone()
    first = experts[0].first_expert if experts else 0
    last = first + (experts[0].n_experts - 1 if experts else 0)
    path = folder / f"experts-{first:05d}-{last:05d}.safetensors"
    save_file(tensors, str(path))
    return path


def write_dense(folder: Path, model: MoETransformer, optimizer: torch.optim.Optimizer, state: dict) -> list[Path]:
    """Dense weights, buffers (every router's bias), their AdamW state, and state.json."""
    tensors = {}
    params = _dense_named_parameters(model)
    for name, t in model.state_dict().items():
        if ".experts." not in name:
            tensors[f"model.{name}"] = t.detach().cpu().clone()
    for name, p in params.items():
        for s in ADAM_STATE:
            if s in optimizer.state.get(p, {}):
                tensors[f"optim.{name}.{s}"] = optimizer.state[p][s].cpu().clone()
    tensors["rng.torch"] = torch.get_rng_state()
    save_file(tensors, str(folder / DENSE))
    (folder / STATE).write_text(json.dumps({"format": FORMAT, **state}, indent=2, sort_keys=True))
    return [folder / DENSE, folder / STATE]


def write_index(folder: Path, entries: list[dict], step: int) -> Path:
    names = [e["name"] for e in entries]
    if len(set(names)) != len(names):
        raise CheckpointError(f"duplicate checkpoint files: {sorted(names)}")
    index = {"format": FORMAT, "step": step, "files": sorted(entries, key=lambda e: e["name"])}
    path = folder / INDEX
    path.write_text(json.dumps(index, indent=2))
    return path


def read_index(folder: Path) -> dict:
    path = Path(folder) / INDEX
    if not path.is_file():
        raise CheckpointError(f"{folder} has no {INDEX}: the checkpoint was never completed")
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from None
    if index.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unknown checkpoint format {index.get('format')!r}")
    return index


def check_sizes(where: str, index: dict, sizes: dict[str, int | None]) -> None:
    """Every indexed file is present (`sizes[name]` not None) with the size the index says."""
    for entry in index["files"]:
        size = sizes.get(entry["name"])
        if size is None:
            raise CheckpointError(f"{where}: {entry['name']} is listed in the index but missing")
        if size != entry["size"]:
            raise CheckpointError(f"{where}: {entry['name']} has {size} bytes, the index says {entry['size']}")


def local_sizes(folder: Path, index: dict) -> dict[str, int | None]:
    paths = {e["name"]: Path(folder) / e["name"] for e in index["files"]}
    return {name: p.stat().st_size if p.is_file() else None for name, p in paths.items()}


def verify(folder: Path, hash_files: set[str] | None = None, sizes: dict[str, int | None] | None = None) -> dict:
    """Check that every indexed file is present with its size (`sizes`: as listed where the
    checkpoint is stored; default: in `folder`), and that `hash_files` (default all) in `folder`
    match their sha256. Returns the index. Raises CheckpointError naming the first bad file."""
    folder = Path(folder)
    index = read_index(folder)
    check_sizes(str(folder), index, sizes if sizes is not None else local_sizes(folder, index))
    for entry in index["files"]:
        checked = hash_files is None or entry["name"] in hash_files
        if checked and sha256_file(folder / entry["name"]) != entry["sha256"]:
            raise CheckpointError(f"{folder}: {entry['name']} does not match its sha256 in the index")
    return index


def _set_adam_state(optimizer, param, step: int, values: dict[str, torch.Tensor]) -> None:
    if not values:
        return
    state = optimizer.state[param]
    state["step"] = torch.tensor(float(step))
    for s, v in values.items():
        state[s] = v.to(param.device, param.dtype)


def files_needed(index: dict, model: MoETransformer) -> list[str]:
    """The files a model reads: dense and training state, and the expert files whose id range
    (in the file name) overlaps the experts the model holds."""
    experts = _expert_modules(model)
    wanted = [DENSE, STATE]
    for name in sorted(e["name"] for e in index["files"]):
        m = re.match(r"^experts-(\d+)-(\d+)\.safetensors$", name)
        if m and any(
            int(m[1]) <= ex.first_expert + ex.n_experts - 1 and ex.first_expert <= int(m[2]) for ex in experts
        ):
            wanted.append(name)
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
        own = model.state_dict()
        with torch.no_grad():
            for name in expected:
                t = f.get_tensor(f"model.{name}")
                if t.shape != own[name].shape:
                    raise CheckpointError(
                        f"{folder}: {name} has shape {tuple(t.shape)}, model has {tuple(own[name].shape)}"
                    )
                own[name].copy_(t)
        if optimizer is not None:
            for name, p in _dense_named_parameters(model).items():
                vals = {s: f.get_tensor(f"optim.{name}.{s}") for s in ADAM_STATE if f"optim.{name}.{s}" in keys}
                _set_adam_state(optimizer, p, step, vals)

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
                i = expert - ex.first_expert
                if not 0 <= i < ex.n_experts:
                    continue
                param = getattr(ex, weight)
                t = f.get_tensor(key)
                if adam is None:
                    with torch.no_grad():
                        param[i].copy_(t)
                    found[(layer, expert)] = found.get((layer, expert), 0) + 1
                elif optimizer is not None:
                    st = optimizer.state[param]
                    if adam not in st:
                        st[adam] = torch.zeros_like(param)
                        st["step"] = torch.tensor(float(step))
                    st[adam][i].copy_(t)
    for layer, ex in enumerate(experts):
        for i in range(ex.n_experts):
            if found.get((layer, ex.first_expert + i)) != 2:
                raise CheckpointError(f"{folder}: no weights for layer {layer} expert {ex.first_expert + i}")
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
