"""Built-in corpus and deterministic sampling (DESIGN 5.4)."""

import numpy as np
import torch

from moe_ray.data import builtin_corpus, decode_bytes, encode_bytes, eval_windows, sample_windows, stdlib_files


def test_samples_depend_only_on_seed_step_and_index():
    tokens = np.arange(10_000, dtype=np.int64) % 251
    whole = sample_windows(tokens, 33, seed=7, step=5, first=0, count=8)
    # Any split of the sample ids across workers gives the same rows.
    parts = torch.cat([sample_windows(tokens, 33, 7, 5, first=a, count=n) for a, n in [(0, 3), (3, 1), (4, 4)]])
    assert torch.equal(whole, parts)
    assert not torch.equal(whole, sample_windows(tokens, 33, seed=7, step=6, first=0, count=8))
    assert not torch.equal(whole, sample_windows(tokens, 33, seed=8, step=5, first=0, count=8))
    # Windows are contiguous runs of the stream (consecutive values mod 251).
    assert (np.diff(whole.numpy(), axis=1) % 251 == 1).all()


def test_builtin_corpus_is_deterministic_and_split_by_file():
    files = stdlib_files()
    assert len(files) > 100
    assert files == sorted(files, key=lambda p: p.as_posix())  # one root, so full path order = relative order
    a = builtin_corpus(max_bytes=2_000_000)
    builtin_corpus.cache_clear()
    b = builtin_corpus(max_bytes=2_000_000)
    assert np.array_equal(a.train, b.train) and np.array_equal(a.val, b.val)
    assert len(a.val) > 0 and len(a.train) > 10 * len(a.val) // 2
    # The first validation file's text does not appear in the training stream.
    first_val = files[19].read_bytes()[:2000]
    assert first_val in a.val.tobytes()
    assert first_val not in a.train.tobytes()


def test_eval_windows_fixed_and_byte_round_trip():
    tokens = np.frombuffer(b"hello world " * 200, dtype=np.uint8)
    w1, w2 = eval_windows(tokens, 17, 4, 3), eval_windows(tokens, 17, 4, 3)
    assert len(w1) == 3 and all(torch.equal(x, y) for x, y in zip(w1, w2, strict=True))
    assert decode_bytes(encode_bytes("héllo")) == "héllo"


def test_builtin_corpus_cache_gives_the_read_corpus_and_survives_a_bad_file(tmp_path, monkeypatch):
    from moe_ray.data import read_builtin_corpus

    monkeypatch.setenv("MOE_RAY_CACHE", str(tmp_path))
    builtin_corpus.cache_clear()
    read = read_builtin_corpus(1_000_000)
    first = builtin_corpus(1_000_000)  # builds and writes the cache
    [cached] = (tmp_path / "corpus").glob("*.npz")
    builtin_corpus.cache_clear()
    again = builtin_corpus(1_000_000)  # from the file
    for got in (first, again):
        assert np.array_equal(got.train, read.train) and np.array_equal(got.val, read.val)
        assert got.description == read.description
    cached.write_bytes(b"not an npz")
    builtin_corpus.cache_clear()
    assert np.array_equal(builtin_corpus(1_000_000).train, read.train)  # rebuilt
    assert np.load(cached)["train"].shape == read.train.shape  # and the file repaired
    builtin_corpus.cache_clear()


def test_builtin_corpus_too_small_for_a_validation_split_names_the_least_max_bytes_that_works():
    import re

    import pytest

    from moe_ray.data import DataError, read_builtin_corpus

    with pytest.raises(DataError, match=r"data.max_bytes 10,000 is too small .* give at least ([\d,]+)") as err:
        read_builtin_corpus(10_000)
    least = int(re.search(r"at least ([\d,]+)", str(err.value))[1].replace(",", ""))
    assert len(read_builtin_corpus(least).val) > 0  # the number given is enough...
    with pytest.raises(DataError, match="too small"):
        read_builtin_corpus(least - 1)  # ...and the least that is
