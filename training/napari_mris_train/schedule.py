"""The one learning-rate schedule of every training loop (decoder, stem warm-up, tokenizers).

A small module of its own so that the tokenizer trainer need not import the decoder trainer (accelerate,
the pipeline) to share it.
"""

from __future__ import annotations

import math


def learning_rate(step: int, total: int, lr: float, min_lr: float, warmup: int) -> float:
    """Linear warmup to `lr`, then cosine down to `min_lr` at the last step (`step` counts from 0)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * min(progress, 1.0)))
