"""Speculative decoding with the MTP module against plain decoding, on a trained quickstart model.

    python bench/decode.py [--quick] [--checkpoint CKPT]

Without --checkpoint it trains the quickstart first (its 300 steps, about 1.5 minutes here).
Greedy decoding of continuations of validation text; plain and speculative runs interleaved,
tokens/s as medians; the texts must be identical.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, short_quickstart, time_it  # noqa: E402

from moe_ray.data import builtin_corpus  # noqa: E402
from moe_ray.inference import generate, load_model  # noqa: E402
from moe_ray.speculative import speculative_generate, truncate_cache  # noqa: E402

BENCH = "decode"


def prompts(n: int, length: int) -> list[list[int]]:
    """`n` prompts of `length` bytes, evenly spaced over the validation text."""
    val = builtin_corpus().val
    starts = torch.linspace(0, len(val) - length - 1, n).long().tolist()
    return [val[s : s + length].tolist() for s in starts]


def measure(model, cases: list[list[int]], new_tokens: int, repeats: int, draft: int) -> dict:
    plain_rates, spec_rates, accepted, drafted = [], [], 0, 0
    for _ in range(repeats):
        for prompt in cases:  # interleaved: the machine's noise hits both alike
            start = time.perf_counter()
            _, plain = generate(model, prompt, new_tokens, temperature=0)
            plain_rates.append(len(plain) / (time.perf_counter() - start))
            start = time.perf_counter()
            _, spec, stats = speculative_generate(model, prompt, new_tokens, temperature=0, draft_tokens=draft)
            spec_rates.append(len(spec) / (time.perf_counter() - start))
            if spec != plain:
                raise SystemExit(f"speculative text differs from plain greedy text for prompt {bytes(prompt)!r}")
            accepted, drafted = accepted + stats.accepted, drafted + stats.drafted
    plain_tps, spec_tps = statistics.median(plain_rates), statistics.median(spec_rates)
    return {
        "plain": plain_tps,
        "speculative": spec_tps,
        "speedup": spec_tps / plain_tps,
        "acceptance": accepted / drafted,
    }


@torch.no_grad()
def round_costs(model, prompt: list[int], repeat: int) -> dict:
    """What one round costs against one plain step: the main model over 2 new tokens (the
    verification of one draft) and one MTP forward, each over a 1-token main-model step."""
    caches = [{} for _ in model.blocks]
    h = model.hidden_states(torch.tensor([prompt]), caches)
    n = len(prompt)

    def main_model(tokens: int):
        model.hidden_states(torch.tensor([prompt[:tokens]]), caches)
        for cache in caches:
            truncate_cache(cache, n)

    mtp_cache: dict = {}
    model.mtp[0](h[:, :-1], model.embed(torch.tensor([prompt[1:]])), mtp_cache)

    def draft():
        model.mtp[0](h[:, -1:], model.embed(torch.tensor([prompt[-1:]])), mtp_cache)
        truncate_cache(mtp_cache, n - 1)

    step = time_it(lambda: main_model(1), repeat)
    return {"verify2": time_it(lambda: main_model(2), repeat) / step, "draft": time_it(draft, repeat) / step}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--checkpoint", help="a trained checkpoint with MTP (default: train the quickstart)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one decode stream, as a server would run per request here
    with tempfile.TemporaryDirectory() as storage:
        checkpoint = args.checkpoint
        if checkpoint is None:
            from moe_ray.runtime.driver import run_job

            job = short_quickstart(storage, 300, checkpoint_every=300)
            checkpoint = run_job(job, run_name="bench-decode").checkpoint
        loaded = load_model(checkpoint, torch.device("cpu"))
    model = loaded.model
    cases = prompts(4 if args.quick else 12, 64)
    new_tokens = 128
    repeats = 2 if args.quick else 3
    costs = round_costs(model, cases[0], 50 if args.quick else 200)
    emit(BENCH, "verify_2_tokens_over_1", round(costs["verify2"], 2), note="main-model forward, KV cache")
    emit(BENCH, "mtp_draft_over_main_step", round(costs["draft"], 2), note="one MTP module vs one main-model step")
    for draft in (1, 2):
        r = measure(model, cases, new_tokens, repeats, draft)
        suffix = "" if draft == 1 else f"_draft{draft}"
        note = {"draft_tokens": draft, "mtp_depth": len(model.mtp), "prompts": len(cases), "new_tokens": new_tokens}
        emit(BENCH, f"mtp_acceptance{suffix}", round(r["acceptance"], 3), **note)
        emit(BENCH, f"speculative_speedup{suffix}", round(r["speedup"], 2), target="> 1", **note)
        emit(BENCH, f"tokens_per_s_plain{suffix}", round(r["plain"], 1))
        emit(BENCH, f"tokens_per_s_speculative{suffix}", round(r["speculative"], 1))


if __name__ == "__main__":
    main()
