"""The tokenizer of an export: what `AutoTokenizer` loads and encodes as the job did.

Byte-level jobs get a `tokenizers` BPE with the 256 byte symbols and no merges, over the
GPT-2 byte-to-character map: each UTF-8 byte becomes the token of its value, as moe-ray's
byte tokens are. A job with a tokenizer.json exports that file as it is.
"""

from __future__ import annotations

import json

from moe_ray.data import DataError
from moe_ray.hf import LayoutError
from moe_ray.storage import s3
from moe_ray.storage.tokenizer_file import tokenizer_bytes

TOKENIZER = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
# Text that exercises what differs between tokenizers: ASCII, code, whitespace runs,
# multi-byte UTF-8, and characters outside the Basic Multilingual Plane.
PROBE = "def f(x):\n\treturn x  ** 2  # größe, 東京, naïve café 🙂\r\n\n  end"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from bytes to printable characters (what the ByteLevel pre-tokenizer uses)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def byte_tokenizer_json() -> str:
    """A tokenizer.json whose ids are the UTF-8 bytes of the text."""
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    except ImportError:
        raise LayoutError("writing the tokenizer needs the tokenizers package: pip install 'moe-ray[hf]'") from None

    vocab = {c: b for b, c in _bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok.to_str()


def read_tokenizer_json(spec: str) -> str:
    """The text of a tokenizer.json at a path or s3:// URI."""
    try:
        return tokenizer_bytes(spec, named_by="the tokenizer").decode()
    except DataError as err:  # it says what to give
        raise LayoutError(str(err)) from None
    except (OSError, s3.StorageError) as err:
        raise LayoutError(f"cannot read the tokenizer {spec}: {err}") from None


def job_tokenizer_json(spec: str) -> str | None:
    """The job's data.tokenizer as text (None for byte tokens)."""
    return None if spec == "bytes" else read_tokenizer_json(spec)


def tokenizer_files(tokenizer_json: str, max_seq_len: int) -> dict[str, bytes]:
    """tokenizer.json and a tokenizer_config.json that makes it a fast tokenizer for AutoTokenizer."""
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": max_seq_len,
        "clean_up_tokenization_spaces": False,
    }
    return {TOKENIZER: tokenizer_json.encode(), TOKENIZER_CONFIG: json.dumps(config, indent=2).encode()}


def encode(tokenizer_json: str | None, text: str) -> list[int]:
    """Ids of `text`: byte tokens for None, else with the tokenizer.json given as a string."""
    if tokenizer_json is None:
        return list(text.encode("utf-8"))
    from tokenizers import Tokenizer

    return Tokenizer.from_str(tokenizer_json).encode(text).ids


def check_same_encoding(job_tokenizer: str | None, folder_tokenizer: str, where: str, fix: str) -> None:
    """Refuse a folder whose tokenizer encodes text differently from the job's."""
    ours, theirs = encode(job_tokenizer, PROBE), encode(folder_tokenizer, PROBE)
    if ours != theirs:
        first = next(
            (i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), min(len(ours), len(theirs))
        )
        raise LayoutError(
            f"{where}'s tokenizer encodes text differently from the job's data.tokenizer "
            f"(first difference at token {first}: {ours[first : first + 4]} vs {theirs[first : first + 4]}): {fix}"
        )
