"""Speculative decoding with the model's own MTP modules as the drafter (DESIGN 11).

Each round, the MTP modules draft k tokens after the last committed one (module k, or module
1 reused, reads the hidden state one level up and the embedding of the token k ahead), and ONE
forward of the main model over [last token, drafts] verifies them all. The longest prefix the
main model agrees with is kept, plus the main model's own next token: 1 to k + 1 tokens per
round. Greedy (temperature 0) keeps exactly the plain greedy text; with temperature > 0 the
standard rejection rule (accept with min(1, p/q), else sample from max(0, p - q)) keeps exactly
the main model's sampling distribution.

Caches: the main model's KV cache and each draft level's are cut back after every round to the
positions whose inputs are committed tokens, so a rejected draft leaves nothing behind.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_ray.inference import fit_context, sample_token, token_probs
from moe_ray.model.transformer import MoETransformer


@dataclass
class SpeculativeStats:
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0

    @property
    def acceptance(self) -> float:
        """Share of the drafted tokens that the main model accepted."""
        return self.accepted / self.drafted if self.drafted else 0.0


def truncate_cache(cache: dict, length: int) -> None:
    """Forget every cached position from `length` on."""
    if "k" in cache:
        cache["k"], cache["v"] = cache["k"][:, :, :length], cache["v"][:, :, :length]


def accept_sampled(p: torch.Tensor, q: torch.Tensor, draft: int, gen: torch.Generator) -> int | None:
    """The rejection rule of speculative sampling: the draft (drawn from q) if accepted, else None.
    Accepting with min(1, p/q) and resampling rejections from max(0, p - q) yields samples of p."""
    if torch.rand((), generator=gen) * q[draft] <= p[draft]:
        return draft
    return None


def residual_sample(p: torch.Tensor, q: torch.Tensor, gen: torch.Generator) -> int:
    rest = (p - q).clamp_min(0)
    total = rest.sum()
    return int(torch.multinomial(rest / total if total > 0 else p, 1, generator=gen))


@torch.no_grad()
def speculative_generate(
    model: MoETransformer,
    prompt: list[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int = 0,
    draft_tokens: int | None = None,
) -> tuple[list[int], list[int], SpeculativeStats]:
    """As `inference.generate` (same prompt handling and context limit), drafting with the MTP
    modules: (the prompt tokens used, the new tokens, the rounds and acceptance)."""
    depth = len(model.mtp)
    if depth == 0:
        raise ValueError("the model has no MTP module (model.mtp.depth is 0): speculative decoding drafts with it")
    n_draft = draft_tokens or depth
    if n_draft < 1:
        raise ValueError(f"draft_tokens={draft_tokens}: draft at least one token per round")
    prompt, max_new_tokens = fit_context(prompt, max_new_tokens, model.cfg.max_seq_len)
    device = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    stats = SpeculativeStats()
    if max_new_tokens == 0:
        return prompt, [], stats

    def tensor(ids: list[int]) -> torch.Tensor:
        return torch.tensor([ids], device=device)

    def logits_of(module_index: int | None, h: torch.Tensor) -> torch.Tensor:
        norm = model.norm if module_index is None else model.mtp[module_index].out_norm
        return model.head(norm(h)).float().cpu()

    caches: list[dict] = [{} for _ in model.blocks]
    trunk = model.hidden_states(tensor(prompt), caches)  # (1, m, d): positions 0..m-1
    tokens = prompt + [sample_token(logits_of(None, trunk[0, -1]), temperature, top_k, gen)]
    new = tokens[len(prompt) :]
    # Per draft level: its KV cache and hidden states, over the positions whose inputs are committed.
    level_caches: list[dict] = [{} for _ in range(n_draft)]
    level_hidden: list[torch.Tensor] = [trunk[:, :0] for _ in range(n_draft)]

    while len(new) < max_new_tokens:
        m = len(tokens) - 1  # the last committed token, not yet in the main model's cache
        k = min(n_draft, max_new_tokens - len(new) - 1)  # the round also adds one token of its own
        drafts: list[int] = []
        draft_probs: list[torch.Tensor] = []
        above = trunk  # the level above's hidden states at positions 0..m-1
        for level in range(k):
            module = level % depth  # with fewer modules than drafts, the last ones are reused
            done = level_hidden[level].shape[1]
            ahead = (tokens + drafts)[done + level + 1 : m + level + 1]  # token j + level + 1 at position j
            out, _ = model.mtp[module](above[:, done:m], model.embed(tensor(ahead)), level_caches[level])
            hidden = torch.cat([level_hidden[level], out], dim=1)
            logits = logits_of(module, hidden[0, -1])
            if temperature > 0:
                q = token_probs(logits, temperature, top_k)
                drafts.append(int(torch.multinomial(q, 1, generator=gen)))
                draft_probs.append(q)
            else:
                drafts.append(int(logits.argmax()))
            # Position j read token j + level + 1: committed for j <= m - level - 1 only.
            keep = m - level
            truncate_cache(level_caches[level], keep)
            level_hidden[level] = hidden[:, :keep]
            above = hidden

        h = model.hidden_states(tensor([tokens[m]] + drafts), caches)  # positions m .. m + k
        logits = logits_of(None, h[0])
        a, extra = 0, None  # drafts accepted; the main model's own token that ends the round
        for i, d in enumerate(drafts):
            if temperature <= 0:
                if int(logits[i].argmax()) != d:
                    break
            else:
                p = token_probs(logits[i], temperature, top_k)
                if accept_sampled(p, draft_probs[i], d, gen) is None:
                    extra = residual_sample(p, draft_probs[i], gen)
                    break
            a += 1
        if extra is None:  # all drafts accepted, or a greedy mismatch: the main model's next token
            extra = sample_token(logits[a], temperature, top_k, gen)
        accepted = drafts[:a] + [extra]
        stats.rounds += 1
        stats.drafted += k
        stats.accepted += a
        # The main model's cache keeps positions m .. m + a: their inputs were tokens now committed.
        for cache in caches:
            truncate_cache(cache, m + a + 1)
        trunk = torch.cat([trunk, h[:, : a + 1]], dim=1)
        tokens += accepted
        new += accepted
    return prompt, new, stats
