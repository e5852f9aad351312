"""User data read with Ray Data (text, JSONL, Parquet; folders), byte or tokenizer.json tokens."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import tiny_job

from moe_ray.runtime.data_loading import DataError, load_in_cluster, load_token_splits
from moe_ray.runtime.driver import run_job
from moe_ray.spec import DataConfig

DOCS = [f"document number {i}: " + "lorem ipsum dolor sit amet " * (i % 5 + 1) for i in range(40)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    (root / "docs.jsonl").write_text("\n".join(json.dumps({"body": d, "id": i}) for i, d in enumerate(DOCS)))
    (root / "docs.txt").write_text("\n".join(DOCS))
    pq.write_table(pa.table({"body": DOCS}), root / "docs.parquet")
    folder = root / "jsonl_folder"
    folder.mkdir()
    for part in range(2):
        (folder / f"part-{part}.jsonl").write_text(
            "\n".join(json.dumps({"body": d}) for d in DOCS[part * 20 : (part + 1) * 20])
        )
    return root


def expected_bytes(docs, nth):
    val = [d for i, d in enumerate(docs) if i % nth == nth - 1]
    train = [d for i, d in enumerate(docs) if i % nth != nth - 1]
    enc = lambda ds: np.frombuffer("".join(d + "\n" for d in ds).encode(), dtype=np.uint8)  # noqa: E731
    return enc(train), enc(val)


@pytest.mark.parametrize(
    "name, fmt", [("docs.jsonl", "auto"), ("docs.parquet", "auto"), ("docs.txt", "auto"), ("jsonl_folder", "jsonl")]
)
def test_formats_give_the_same_stream_in_order(local_ray, corpus, name, fmt):
    cfg = DataConfig(source=str(corpus / name), format=fmt, text_field="body", val_every_nth_doc=10)
    ref, description = load_in_cluster(cfg, vocab_size=256)  # read and tokenised by a Ray task
    splits = local_ray.get(ref)
    train, val = expected_bytes(DOCS, 10)
    assert np.array_equal(splits.train, train) and np.array_equal(splits.val, val)
    assert description == f"{cfg.source}: 40 documents, {len(train):,} train / {len(val):,} val tokens"


def test_tokenizer_json(local_ray, corpus, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(DOCS, trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    tok.save(str(tmp_path / "tokenizer.json"))
    cfg = DataConfig(source=str(corpus / "docs.jsonl"), text_field="body", tokenizer=str(tmp_path / "tokenizer.json"))
    splits = load_token_splits(cfg, vocab_size=256)
    first_train_doc = tok.encode(DOCS[0]).ids
    assert splits.train[: len(first_train_doc)].tolist() == first_train_doc
    assert splits.train.max() < tok.get_vocab_size()
    with pytest.raises(DataError, match="raise model.vocab_size"):
        load_token_splits(cfg, vocab_size=4)


def test_bad_data_refused_with_a_clear_message(local_ray, corpus):
    # Raised inside the Ray task that reads the data, and handed back with its message.
    with pytest.raises(DataError, match="does not exist"):
        load_in_cluster(DataConfig(source=str(corpus / "nope.jsonl")), 256)
    with pytest.raises(DataError, match=r"no field 'text' \(has \['body', 'id'\]\); set data.text_field"):
        load_in_cluster(DataConfig(source=str(corpus / "docs.jsonl")), 256)
    with pytest.raises(DataError, match="set data.format"):
        load_in_cluster(DataConfig(source=str(corpus / "jsonl_folder")), 256)


def test_a_run_on_user_data(local_ray, corpus, tmp_path):
    job = tiny_job(
        tmp_path,
        data={"source": str(corpus / "docs.parquet"), "text_field": "body", "val_every_nth_doc": 10},
        train__steps=2,
        train__seq_len=16,
    )
    result = run_job(job, run_name="user-data")
    assert result.final_step == 2 and result.val_loss is not None
