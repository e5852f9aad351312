"""`model.init_from`: start training from a Hugging Face glm4_moe folder (local or S3).

The driver checks the folder against the job before any worker starts (every disagreement
named); each worker then loads only its own experts' tensors (from S3, only their shards)."""

from __future__ import annotations

from moe_ray.hf import LayoutError
from moe_ray.hf.folder import load_into, needed_tensors, open_folder, weight_map_of
from moe_ray.hf.layout import import_problems, links
from moe_ray.hf.tokenizer import TOKENIZER, check_same_encoding, job_tokenizer_json
from moe_ray.model.transformer import MoETransformer
from moe_ray.spec import JobSpec


def check_init_from(job: JobSpec) -> str:
    """Refuse (LayoutError) a folder that does not fit the job; a one-line description if it does."""
    uri = job.model.init_from
    with open_folder(uri, tensors=set()) as folder:  # from S3: config, index and tokenizer only
        config = folder.config()
        problems = import_problems(config, job.model)
        if not problems:
            have = set(weight_map_of(folder.path, uri))
            want = {name for link in links(job.model) for name in link.theirs}
            missing = sorted(want - have)
            if missing:
                more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
                problems.append(f"tensors missing: {', '.join(missing[:3])}{more}")
        if problems:
            raise LayoutError(
                f"model.init_from {uri} does not fit this job ({len(problems)} problem(s)):\n  " + "\n  ".join(problems)
            )
        tokenizer = folder.path / TOKENIZER
        if tokenizer.is_file():
            fix = f"set data.tokenizer to {uri}/{TOKENIZER} (or to the tokenizer.json the model was trained with)"
            ours = job_tokenizer_json(job.data.tokenizer)
            check_same_encoding(ours, tokenizer.read_text(), f"model.init_from {uri}", fix)
    return f"weights from {uri} ({config['num_hidden_layers']} layers, {config['n_routed_experts']} experts)"


def load_init_from(model: MoETransformer, uri: str) -> None:
    """Fill `model` (a whole model or one worker's shard) from the folder at `uri`."""
    with open_folder(uri, needed_tensors(model)) as folder, folder.reader() as read:
        load_into(model, read)
