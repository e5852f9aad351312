"""The training step and the single-process trainer (no Ray)."""
