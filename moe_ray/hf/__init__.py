"""Hugging Face interop: export to and start from the `glm4_moe` model layout (DESIGN 11)."""


class LayoutError(Exception):
    """A model or a Hugging Face folder that the glm4_moe layout cannot carry, or that disagrees
    with the job; the message names every field concerned. Here, not in `layout` (which loads
    torch): `hf.tokenizer` raises it, and `moe-ray prepare`, which needs no torch, imports that."""
