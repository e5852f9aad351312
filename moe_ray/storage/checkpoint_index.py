"""A checkpoint's index (DESIGN 5.5): index.json lists every file of the checkpoint with its size
and sha256, and is written last, so a folder without it was never completed. Reading and checking
it needs no torch: the CLI's commands that only look at runs (submit's refusal of a run name in
use, status, list) import this, not the checkpoint format's tensors.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

FORMAT = 1
INDEX = "index.json"
STATE = "state.json"


class CheckpointError(Exception):
    """A checkpoint that must not be trusted (incomplete, altered, or of another model)."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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


def read_state(folder: Path) -> dict:
    """state.json, once the index vouches for it (present, listed, size and sha256): nothing in it
    is used before."""
    folder = Path(folder)
    index = verify(folder, hash_files={STATE})
    if STATE not in {e["name"] for e in index["files"]}:
        raise CheckpointError(f"{folder}: {STATE} is not listed in the index")
    try:
        return json.loads((folder / STATE).read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{folder}/{STATE} is not valid JSON: {err}") from None
