"""Speculative decoding with the MTP modules: the same text as plain decoding (DESIGN 11)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import single_process_trainer, tiny_job, write_checkpoint

from moe_ray.inference import generate
from moe_ray.speculative import accept_sampled, residual_sample, speculative_generate
from moe_ray.train.trainer import build_model

CLI = Path(sys.executable).parent / "moe-ray"
PROMPTS = [b"def main(self):\n    return ", b"import os\nclass Foo:\n    ", b"    for i in range("]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A model with two MTP modules, trained enough that some drafts are right and some wrong."""
    job = tiny_job(
        tmp_path_factory.mktemp("runs"), train__steps=200, train__lr=3e-3, train__batch_size=16, model__mtp__depth=2
    )
    trainer = single_process_trainer(job)
    trainer.fit()
    return job, trainer.model.eval()


def test_greedy_speculative_text_equals_plain_greedy(trained):
    job, model = trained
    untrained = build_model(job.model, job.balance, 1, torch.device("cpu")).eval()
    partial = []
    for m in (model, untrained):
        for prompt in PROMPTS:
            plain = generate(m, list(prompt), 36, temperature=0)  # prompt and new tokens fit the context of 64
            for draft in (1, 2, 3):  # 3: module 2 reused for the third draft
                used, new, stats = speculative_generate(m, list(prompt), 36, temperature=0, draft_tokens=draft)
                assert (used, new) == plain, (prompt, draft)
                assert len(new) == 36 and stats.rounds < 36 or stats.acceptance == 0
                partial.append(0 < stats.acceptance < 1)
    assert sum(partial) >= 3  # rejections mid-round happened: the caches were cut back and stayed right


def test_speculative_respects_the_context_and_the_count(trained):
    job, model = trained
    long_prompt = list(range(40)) * 3  # context 64
    used, new, _ = speculative_generate(model, long_prompt, 500, temperature=0, draft_tokens=3)
    assert (used, new) == generate(model, long_prompt, 500, temperature=0)
    assert len(used) + len(new) == job.model.max_seq_len
    for n in (1, 2, 5):
        assert len(speculative_generate(model, list(PROMPTS[0]), n, temperature=0.8, top_k=20, seed=1)[1]) == n
    a = speculative_generate(model, list(PROMPTS[1]), 30, temperature=1.0, seed=3)[1]
    assert a == speculative_generate(model, list(PROMPTS[1]), 30, temperature=1.0, seed=3)[1]
    assert a != speculative_generate(model, list(PROMPTS[1]), 30, temperature=1.0, seed=4)[1]


def test_rejection_rule_samples_the_main_models_distribution():
    """Draft from q, accept with min(1, p/q), else resample from max(0, p - q): the output is p."""
    gen = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    q = torch.tensor([0.1, 0.1, 0.4, 0.3, 0.1])
    n = 40_000
    counts = torch.zeros(5)
    for _ in range(n):
        d = int(torch.multinomial(q, 1, generator=gen))
        kept = accept_sampled(p, q, d, gen)
        counts[kept if kept is not None else residual_sample(p, q, gen)] += 1
    assert (counts / n - p).abs().max() < 0.01  # 3 sigma of the sampling noise is ~0.0075
    # and not q, nor the drafts as they came
    assert (counts / n - q).abs().max() > 0.2


def test_generate_command_speculative(trained, tmp_path):
    job, model = trained
    folder = write_checkpoint(tmp_path / "ckpt", job, model)
    args = [
        str(CLI),
        "generate",
        str(folder),
        "--prompt",
        "    for i in range(",
        "--max-new-tokens",
        "30",
        "--temperature",
        "0",
    ]
    plain = subprocess.run(args, capture_output=True, text=True, timeout=300)
    spec = subprocess.run(args + ["--speculative", "--draft-tokens", "2"], capture_output=True, text=True, timeout=300)
    assert plain.returncode == 0 and spec.returncode == 0, spec.stderr
    assert spec.stdout == plain.stdout
    assert "drafted tokens accepted" in spec.stderr and "tokens/s" in spec.stderr
    no_mtp = tiny_job(tmp_path / "r", model__mtp__depth=0)
    bare = write_checkpoint(tmp_path / "bare", no_mtp)
    out = subprocess.run(
        [str(CLI), "generate", str(bare), "--prompt", "x", "--speculative"], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 2 and "no MTP module" in out.stderr
