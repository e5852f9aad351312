"""The tokenizer.json a job names in data.tokenizer (a path or an s3:// URI), or byte-level
tokens ("bytes"): its bytes, and the `tokenizers` Tokenizer it loads (None for bytes)."""

from __future__ import annotations

from pathlib import Path

from moe_ray.data import BYTE_VOCAB, DataError
from moe_ray.storage import s3
from moe_ray.storage.location import Location


def load_tokenizer(spec: str):
    """None for byte-level tokens, else a `tokenizers.Tokenizer` from a tokenizer.json."""
    if spec == "bytes":
        return None
    from tokenizers import Tokenizer

    data = tokenizer_bytes(spec)
    try:
        return Tokenizer.from_str(data.decode("utf-8"))
    except Exception as err:  # tokenizers raises a plain Exception; a binary file, UnicodeDecodeError
        raise DataError(f"data.tokenizer {spec!r} is not a tokenizer.json that tokenizers can read: {err}") from None


def tokenizer_bytes(spec: str, named_by: str = "data.tokenizer") -> bytes:
    """The tokenizer.json file named by `spec` (a path or s3:// URI), which `named_by` gave."""
    if spec.startswith("s3://"):
        return s3.read_bytes(Location(spec))
    if not Path(spec).is_file():
        raise DataError(f"{named_by} {spec!r} is not a file (give a tokenizer.json, or 'bytes')")
    return Path(spec).read_bytes()


def tokenizer_vocab(tokenizer) -> int:
    """The vocabulary size of a loaded tokenizer (None: bytes)."""
    return BYTE_VOCAB if tokenizer is None else tokenizer.get_vocab_size()
