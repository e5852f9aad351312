"""Whether a tensor is a DTensor (an FSDP shard), without loading torch.distributed.tensor.

A DTensor exists only in a process that has loaded that module (FSDP does), so asking
sys.modules is exact, and a process that never shards (eval, generate, export: one whole
model) does without what that module imports (a 20-token `moe-ray generate`: 2.8 -> 2.0 s).
"""

from __future__ import annotations

import sys

import torch


def is_dtensor(t: torch.Tensor) -> bool:
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)
