"""eval and generate on a checkpoint made by a short run."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_job

from moe_ray.inference import generate, load_model
from moe_ray.runtime.driver import run_job

CLI = Path(sys.executable).parent / "moe-ray"


@pytest.fixture(scope="module")
def checkpoint(local_ray, tmp_path_factory):
    job = tiny_job(tmp_path_factory.mktemp("runs"), train__steps=4, model__max_seq_len=48)
    return run_job(job, run_name="infer").checkpoint


def test_kv_cache_logits_equal_full_forward(checkpoint):
    model = load_model(checkpoint, torch.device("cpu")).model
    tokens = torch.randint(0, 256, (1, 20))
    full = model(tokens)
    caches = [{} for _ in model.blocks]
    step = torch.cat([model(tokens[:, :12], caches)] + [model(tokens[:, i : i + 1], caches) for i in range(12, 20)], 1)
    torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-4)


def test_generate_is_deterministic_stops_at_n_and_handles_long_prompts(checkpoint):
    model = load_model(checkpoint, torch.device("cpu")).model
    prompt = list(b"def main():")
    a = generate(model, prompt, 10, temperature=1.0, top_k=20, seed=3)[1]
    b = generate(model, prompt, 10, temperature=1.0, top_k=20, seed=3)[1]
    c = generate(model, prompt, 10, temperature=1.0, top_k=20, seed=4)[1]
    assert a == b and len(a) == 10 and a != c
    long_prompt = list(range(40)) * 3  # 120 tokens, context 48
    used, new = generate(model, long_prompt, 8, temperature=0)
    assert used == long_prompt[-40:] and len(new) == 8
    # More new tokens than the context holds: a prompt that fits is kept whole and the new
    # tokens fill the rest; one that does not keeps its end, and half the context is new tokens.
    used, new = generate(model, prompt, 500, temperature=0)
    assert used == prompt and len(new) == 48 - len(prompt)
    used, new = generate(model, long_prompt, 500, temperature=0)
    assert used == long_prompt[-24:] and len(new) == 24
    used, new = generate(model, long_prompt[:40], 20, temperature=0)
    assert used == long_prompt[12:40] and len(new) == 20  # the prompt gives way to up to half


def test_eval_and_generate_commands(checkpoint):
    out = subprocess.run([str(CLI), "eval", checkpoint, "--batches", "2"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "val loss" in out.stdout and "perplexity" in out.stdout and "MaxVio_global mean" in out.stdout
    assert "tokens/s" in out.stdout
    args = ["--prompt", "import os", "--max-new-tokens", "12", "--seed", "1"]
    first = subprocess.run([str(CLI), "generate", checkpoint, *args], capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    # The run's folder names its newest complete checkpoint: the same model, the same text.
    run = str(Path(checkpoint).parent)
    second = subprocess.run([str(CLI), "generate", run, *args], capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert first.stdout == second.stdout and first.stdout.startswith("import os")
    assert f"(checkpoint {checkpoint}, step 4: the run's newest complete one)" in second.stderr
    bad = subprocess.run([str(CLI), "eval", "/nonexistent/step-1"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "not a checkpoint folder" in bad.stderr


def test_a_checkpoint_read_into_one_model_loads_no_dtensor(checkpoint, tmp_path):
    """generate, eval and export read a checkpoint into one whole model: torch.distributed.tensor
    (FSDP's; a 20-token generate took 2.8 s with it, 2.0 s without) was imported by each for a
    type check."""
    from conftest import cli_then_loaded

    commands = [
        ["generate", checkpoint, "--prompt", "import", "--max-new-tokens", "2"],
        ["eval", checkpoint, "--batches", "1"],
        ["export", checkpoint, str(tmp_path / "hf")],
    ]
    out = cli_then_loaded(commands, exit_code=0, packages=("torch.distributed.tensor",))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("import") and (tmp_path / "hf" / "config.json").is_file(), out.stdout


def test_a_tokenizer_the_model_was_not_trained_with_is_refused(checkpoint, tmp_path):
    """generate and eval took any --tokenizer: text of ids the model never saw, or an IndexError
    in the embedding for ids beyond its vocabulary."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, trainers
    from typer.testing import CliRunner

    from moe_ray.cli import app
    from moe_ray.data import DataError
    from moe_ray.inference import Tokenizer

    words = HFTokenizer(models.WordLevel(unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.train_from_iterator(["a b c d e"], trainers.WordLevelTrainer(special_tokens=["[UNK]", "<|endoftext|>"]))
    words.save(str(tmp_path / "tok.json"))
    for command in (["generate", checkpoint, "--prompt", "a b"], ["eval", checkpoint]):
        out = CliRunner().invoke(app, [*command, "--tokenizer", str(tmp_path / "tok.json")])
        assert out.exit_code == 1, out.output
        assert "the model was trained on byte tokens (data.tokenizer: bytes): leave --tokenizer out" in out.output
    with pytest.raises(DataError, match="has 7 tokens, more than the model's 4: give the tokenizer.json the model"):
        Tokenizer(str(tmp_path / "tok.json"), model_vocab=4)
    assert Tokenizer(str(tmp_path / "tok.json"), model_vocab=7).encode("a b") == words.encode("a b").ids


def test_a_run_folder_names_its_newest_complete_checkpoint(checkpoint, tmp_path):
    import shutil

    from moe_ray.storage.catalog import resolve_checkpoint
    from moe_ray.storage.checkpoint import CheckpointError

    assert resolve_checkpoint(checkpoint) == checkpoint
    run = tmp_path / "run"
    older, newest, broken = run / "step-00000002", run / "step-00000003", run / "step-00000007"
    for folder in (older, newest, broken):
        shutil.copytree(checkpoint, folder)
    biggest = max((p for p in broken.iterdir() if p.name != "index.json"), key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[:-1])  # an upload cut short: the index says one more byte
    assert resolve_checkpoint(str(run)) == str(newest)  # not step 7, which is incomplete
    shutil.rmtree(older)
    shutil.rmtree(newest)
    with pytest.raises(CheckpointError, match="checkpoints are all incomplete \\(step-00000007\\)"):
        resolve_checkpoint(str(run))
    with pytest.raises(CheckpointError, match="nor a run folder"):
        resolve_checkpoint(str(tmp_path))


def test_eval_data_scores_all_of_it_and_prints_no_ray_data_progress(checkpoint, tmp_path):
    import json

    docs = [f"def f{i}(x):\n    return x * {i}\n" * (i % 7 + 1) for i in range(120)]
    path = tmp_path / "docs.export"  # a name that does not tell the format: --format does
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    out = subprocess.run(
        [str(CLI), "eval", checkpoint, "--data", str(path), "--format", "jsonl"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    n_tokens = sum(len(d.encode()) + 1 for d in docs)  # byte tokens, a newline after each document
    assert f"all 120 documents, {n_tokens:,} tokens" in out.stderr
    job = load_model(checkpoint, torch.device("cpu")).job
    seq, extra = job.train.seq_len, 1 + job.model.mtp.depth
    scored = (n_tokens - extra) // seq * seq  # every window of seq_len predictions that fits
    assert f"{scored:,} tokens scored" in out.stdout
    noise = [line for line in out.stderr.splitlines() if "Dataset" in line or "Progress" in line]
    assert not noise, noise
    # One document is enough to score (training needs two: a train and a validation split). In
    # this process, on the module's Ray (a CLI start of its own costs ~10 s; the CLI is above).
    from moe_ray.runtime.data_loading import eval_tokens
    from moe_ray.spec import DataConfig

    line = "def f(x): return x * 2; " * 10  # text: a line is a document
    (tmp_path / "one.txt").write_text(line)
    tokens, description = eval_tokens(DataConfig(source=str(tmp_path / "one.txt")), 256, whole=True)
    assert description.endswith(f"all 1 documents, {len(line) + 1} tokens") and len(tokens) == len(line) + 1


def test_tiling_windows_predict_every_token_once():
    import numpy as np

    from moe_ray.data import tiling_windows
    from moe_ray.train.evaluate import evaluate

    tokens = np.arange(1000) % 256
    windows = tiling_windows(tokens, 32, 2, 5)
    rows = torch.cat(windows)
    assert rows.shape[1] == 34 and [w.shape[0] for w in windows][-1] < 5  # an uneven last batch
    predicted = torch.cat([r[1:33] for r in rows])  # each window's trunk targets
    assert (
        predicted.tolist() == [i % 256 for i in range(1, 1 + len(predicted))]
        and len(predicted) == (1000 - 2) // 32 * 32
    )
    # The loss over uneven batches is the mean over all rows, as one batch would give it.
    job = tiny_job(".", model__max_seq_len=48)
    from moe_ray.train.trainer import build_model

    model = build_model(job.model, job.balance, 0, torch.device("cpu"))
    windows = tiling_windows(tokens, 32, 2, 3)
    assert evaluate(model, windows).loss == pytest.approx(evaluate(model, [torch.cat(windows)]).loss, rel=1e-5)
