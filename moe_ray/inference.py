"""Using a trained model: load a checkpoint into one process, evaluate it, sample from it.

A checkpoint of any worker count loads into a single full model (experts are keyed by global
id). Routing uses the trained bias, which the checkpoint carries in every router.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from moe_ray.data import DataError, decode_bytes, encode_bytes
from moe_ray.model.transformer import MoETransformer
from moe_ray.spec import JobSpec, JobSpecError, parse_job
from moe_ray.storage import checkpoint as ckpt
from moe_ray.storage.catalog import resolve_checkpoint
from moe_ray.storage.checkpoint_index import read_state
from moe_ray.storage.tokenizer_file import load_tokenizer, tokenizer_vocab
from moe_ray.train.evaluate import EvalResult, evaluate
from moe_ray.train.trainer import build_model, default_device


@dataclass
class LoadedModel:
    model: MoETransformer
    job: JobSpec
    step: int
    uri: str  # the checkpoint read: the one given, or a given run folder's newest


def load_model(uri: str, device: torch.device | None = None) -> LoadedModel:
    """The model of a checkpoint (or of a run folder's newest complete checkpoint), built from its
    state.json only after the index has vouched for that file, and only from a job that validates
    as a job file would."""
    device = device or default_device()
    uri = resolve_checkpoint(uri)
    with ckpt.local_checkpoint(uri) as folder:
        state = read_state(folder)
        try:
            job = parse_job(state.get("job"), f"{uri} ({ckpt.STATE})")
        except JobSpecError as err:
            raise ckpt.CheckpointError(str(err)) from None
        model = build_model(job.model, job.balance, job.train.seed, device)
        loaded = ckpt.load(folder, model, None)
    model.eval()
    return LoadedModel(model=model, job=job, step=loaded.step, uri=uri)


def path_named_by(what: str, value: str, given: str | None, option: str) -> str:
    """The data source or tokenizer to read: the one the user gave, or the checkpoint's own when it
    is built in (`builtin`, `bytes`). moe-ray never opens a path or URI just because a checkpoint
    names it: the user repeats it."""
    if given is not None:
        if what == "tokenizer" and value == "bytes" and given != "bytes":  # ids the model never saw
            raise ckpt.CheckpointError(
                f"the model was trained on byte tokens (data.tokenizer: bytes): leave {option} out"
            )
        return given
    if value in ("builtin", "bytes"):
        return value
    raise ckpt.CheckpointError(
        f"the checkpoint's job reads its {what} from {value!r}; moe-ray does not open paths named inside a "
        f"checkpoint on its own: pass {option} {value} (or another) to use it"
    )


class Tokenizer:
    """Bytes, or the job's tokenizer.json: what the model was trained with."""

    def __init__(self, spec: str, model_vocab: int | None = None):
        self.hf = load_tokenizer(spec)
        vocab = tokenizer_vocab(self.hf)
        if model_vocab is not None and vocab > model_vocab:  # its ids would be out of the model's range
            raise DataError(
                f"the tokenizer {spec} has {vocab} tokens, more than the model's {model_vocab}: give the "
                "tokenizer.json the model was trained with"
            )

    def encode(self, text: str) -> list[int]:
        return encode_bytes(text) if self.hf is None else self.hf.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return decode_bytes(ids) if self.hf is None else self.hf.decode(ids)


@dataclass
class EvalReport:
    result: EvalResult
    tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


def evaluate_checkpoint(loaded: LoadedModel, windows: list[torch.Tensor]) -> EvalReport:
    """Loss, expert load and speed of the model over `windows` (batches of token windows)."""
    device = next(loaded.model.parameters()).device
    windows = [w.to(device) for w in windows]
    start = time.perf_counter()
    result = evaluate(loaded.model, windows, loaded.job.train.precision)
    return EvalReport(result, sum(w.shape[0] * loaded.job.train.seq_len for w in windows), time.perf_counter() - start)


@torch.no_grad()
def generate(
    model: MoETransformer,
    prompt: list[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
) -> tuple[list[int], list[int]]:
    """Sample up to `max_new_tokens` tokens after `prompt` with a KV cache.

    Returns (the prompt tokens actually used, the new tokens): both fit the context
    (model.max_seq_len), as `fit_context` shares it. temperature 0 = greedy.
    Deterministic for a given seed."""
    prompt, max_new_tokens = fit_context(prompt, max_new_tokens, model.cfg.max_seq_len)
    device = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    caches: list[dict] = [{} for _ in model.blocks]
    logits = model(torch.tensor([prompt], device=device), caches)[0, -1]
    out: list[int] = []
    for _ in range(max_new_tokens):
        token = sample_token(logits.float().cpu(), temperature, top_k, gen)
        out.append(token)
        if len(out) == max_new_tokens:
            break
        logits = model(torch.tensor([[token]], device=device), caches)[0, -1]
    return prompt, out


def fit_context(prompt: list[int], max_new_tokens: int, ctx: int) -> tuple[list[int], int]:
    """(the prompt's tokens that fit, the new tokens allowed): together at most `ctx` positions.
    The new tokens get the room the prompt leaves, and when asked for more, up to half the
    context: only then is the prompt's start cut (a prompt that fits is never cut to make room
    for a long continuation)."""
    prompt = prompt or [0]
    max_new_tokens = max(0, min(max_new_tokens, max(ctx - len(prompt), ctx // 2)))
    return prompt[-(ctx - max_new_tokens) :], max_new_tokens


def token_probs(logits: torch.Tensor, temperature: float, top_k: int | None) -> torch.Tensor:
    """The sampling distribution over the vocabulary (temperature > 0), after top-k."""
    logits = logits.float() / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return logits.softmax(-1)


def sample_token(logits: torch.Tensor, temperature: float, top_k: int | None, gen: torch.Generator) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    return int(torch.multinomial(token_probs(logits, temperature, top_k), 1, generator=gen))
