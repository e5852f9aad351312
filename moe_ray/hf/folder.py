"""Hugging Face model folders on disk or S3: write one from a model, read one into a model.

A folder holds config.json, safetensors shards with `model.safetensors.index.json`, the
tokenizer (`hf.tokenizer`) and `moe_ray_export.json` (where it came from).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moe_ray.hf import LayoutError
from moe_ray.hf.layout import Link, extra_tensors, from_hf, hf_config, links, their_names, to_hf
from moe_ray.model.transformer import MoETransformer
from moe_ray.storage import s3
from moe_ray.storage.checkpoint import assign
from moe_ray.storage.location import Location, refuse_occupied, staging_sibling

CONFIG = "config.json"
INDEX = "model.safetensors.index.json"
PROVENANCE = "moe_ray_export.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# The balance bias steers top-k by steps of ~1e-3: bf16 would erase them (transformers keeps it fp32 too).
FP32_ALWAYS = ("e_score_correction_bias",)


def hf_tensors(model: MoETransformer) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the export of a whole (single-process) model, in a fixed order."""
    state = model.state_dict()
    for link in links(model.cfg):
        yield from to_hf(link, state[link.ours])
    yield from extra_tensors(model.cfg, state)


def _shard_plan(tensors: list[tuple[str, torch.Tensor]], max_bytes: int, dtype: torch.dtype) -> list[list[int]]:
    shards, size = [[]], 0
    for i, (name, t) in enumerate(tensors):
        n = t.numel() * (4 if name.endswith(FP32_ALWAYS) else dtype.itemsize)
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += n
    return shards


def upload_folder(folder: Path, out: Location, on_file: Callable[[int, int], None] | None = None) -> None:
    """Upload a written model folder to the S3 prefix `out`, config.json last: until it is there,
    readers (transformers, vLLM, `init_from`) see no model. A failed upload deletes what it wrote."""
    files = sorted((p for p in folder.iterdir() if p.name != CONFIG), key=lambda p: p.name) + [folder / CONFIG]
    try:
        for i, path in enumerate(files, start=1):
            s3.upload_file(path, out.child(path.name))
            if on_file:
                on_file(i, len(files))
    except BaseException:
        with contextlib.suppress(Exception):
            s3.delete_prefix(out)
        raise


def write_folder(
    model: MoETransformer,
    out: Path,
    tokenizer_files: dict[str, bytes],
    provenance: dict,
    dtype: str = "float32",
    max_shard_bytes: int = 5 * 2**30,
    on_shard: Callable[[int, int], None] | None = None,
) -> dict:
    """Write the export of `model` to the new folder `out` (refused if it exists and is not empty).
    Everything goes to a sibling temporary folder first, renamed into place at the end: an
    interrupted export leaves nothing that looks like a model. Returns the config written."""
    out = Path(out)
    refuse_occupied(str(out), LayoutError)
    config = hf_config(model.cfg, dtype)
    torch_dtype = DTYPES[dtype]
    tensors = list(hf_tensors(model))
    plan = _shard_plan(tensors, max_shard_bytes, torch_dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_sibling(out)
    try:
        weight_map, total = {}, 0
        for s, indices in enumerate(plan, start=1):
            file = f"model-{s:05d}-of-{len(plan):05d}.safetensors"
            shard = {}
            for i in indices:
                name, t = tensors[i]
                want = torch.float32 if name.endswith(FP32_ALWAYS) else torch_dtype
                # A copy of its own: safetensors refuses tensors that share storage (views of w13).
                shard[name] = t.detach().to("cpu", want).clone(memory_format=torch.contiguous_format)
                weight_map[name] = file
                total += shard[name].nbytes
            save_file(shard, str(tmp / file), metadata={"format": "pt"})
            if on_shard:
                on_shard(s, len(plan))
        (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        (tmp / CONFIG).write_text(json.dumps(config, indent=2))
        for name, data in tokenizer_files.items():
            (tmp / name).write_bytes(data)
        (tmp / PROVENANCE).write_text(json.dumps(provenance, indent=2))
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return config


# --- reading ---------------------------------------------------------------------------------


class HFFolder:
    """A local Hugging Face folder (an S3 one is downloaded first: `open_folder`)."""

    def __init__(self, path: Path, uri: str):
        self.path, self.uri = Path(path), uri

    def config(self) -> dict:
        try:
            return json.loads((self.path / CONFIG).read_text())
        except FileNotFoundError:
            raise LayoutError(f"{self.uri} has no {CONFIG}: not a Hugging Face model folder") from None
        except json.JSONDecodeError as err:
            raise LayoutError(f"{self.uri}/{CONFIG} is not valid JSON ({err})") from None

    @contextlib.contextmanager
    def reader(self) -> Iterator[Callable[[str], torch.Tensor]]:
        """read(name) -> tensor, from whichever shard holds it."""
        weight_map = weight_map_of(self.path, self.uri)
        with contextlib.ExitStack() as stack:
            opened = {}

            def read(name: str) -> torch.Tensor:
                file = weight_map.get(name)
                if file is None:
                    raise LayoutError(f"{self.uri} has no tensor {name}")
                if file not in opened:
                    opened[file] = stack.enter_context(safe_open(str(self.path / file), framework="pt"))
                return opened[file].get_tensor(name)

            yield read


def weight_map_of(path: Path, uri: str) -> dict[str, str]:
    """{tensor name: shard file} from the index, or from the one `model.safetensors`."""
    if (path / INDEX).is_file():
        return json.loads((path / INDEX).read_text())["weight_map"]
    single = path / "model.safetensors"
    if single.is_file():
        with safe_open(str(single), framework="pt") as f:
            return {k: single.name for k in f.keys()}
    raise LayoutError(f"{uri} has neither {INDEX} nor model.safetensors")


@contextlib.contextmanager
def open_folder(uri: str, tensors: set[str] | None = None) -> Iterator[HFFolder]:
    """The folder at `uri` (local, or s3:// downloaded to a temporary folder). From S3, only the
    small files and the shards that hold `tensors` come down (all shards when None)."""
    loc = Location(uri)
    if not loc.is_s3:
        if not loc.local_path.is_dir():
            raise LayoutError(f"{uri} is not a folder")
        yield HFFolder(loc.local_path, uri)
        return
    with tempfile.TemporaryDirectory(prefix="moe-ray-hf-") as tmp:
        dest = Path(tmp)
        names = {o["Key"].rsplit("/", 1)[-1] for o in s3.list_objects(loc)}
        if CONFIG not in names:
            raise LayoutError(f"{uri} has no {CONFIG}: not a Hugging Face model folder")
        small = [n for n in names if not n.endswith(".safetensors")]
        for name in small:
            (dest / name).write_bytes(s3.read_bytes(loc.child(name)))
        if INDEX in names:
            weight_map = json.loads((dest / INDEX).read_text())["weight_map"]
            shards = (
                set(weight_map.values()) if tensors is None else {weight_map[t] for t in tensors if t in weight_map}
            )
        else:
            shards = {"model.safetensors"} & names
        for name in sorted(shards):
            (dest / name).write_bytes(s3.read_bytes(loc.child(name)))
        yield HFFolder(dest, uri)


def held_experts(model: MoETransformer, link: Link) -> tuple[int, ...] | None:
    """The global ids of the experts `model` holds of an expert link (None for other links)."""
    if not link.per_expert:
        return None
    experts = model.get_submodule(link.ours.rsplit(".", 1)[0])
    return experts.expert_ids


def needed_tensors(model: MoETransformer) -> set[str]:
    """Their names of the tensors `model` (maybe one worker's shard of the experts) loads."""
    return {n for link in links(model.cfg) for n in their_names(link, held_experts(model, link))}


@torch.no_grad()
def load_into(model: MoETransformer, read: Callable[[str], torch.Tensor]) -> None:
    """Fill `model` (a whole model, or one worker's expert shard, FSDP-sharded or not) with the
    weights and balance bias of a glm4_moe folder. Every tensor is checked before any is
    copied: a folder that does not fit leaves the model as it was."""
    own = model.state_dict()
    table = links(model.cfg)
    missing = sorted(set(own) - {link.ours for link in table})
    if missing:
        raise LayoutError(f"no Hugging Face tensor maps to {missing[:3]}")
    loaded = {}
    for link in table:
        t = from_hf(link, read, held_experts(model, link))
        if t.shape != own[link.ours].shape:
            raise LayoutError(
                f"{link.theirs[0]} gives {link.ours} the shape {tuple(t.shape)}; "
                f"the model has {tuple(own[link.ours].shape)}"
            )
        loaded[link.ours] = t
    for name, t in loaded.items():
        assign(own[name], t.to(own[name].dtype))
