"""Hugging Face interop: export to and start from the `glm4_moe` model layout (DESIGN 11)."""
