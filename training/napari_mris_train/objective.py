"""What one optimisation step of the decoder computes, shared by `train` (trainer.py) and `finetune`.

- `Objective`: the decoder and its losses as one module; its forward takes a collated batch
  (`collate_samples`) and returns the loss terms of `losses.compute_losses`. Why a module rather than a
  function: the losses read the decoder's unembedding and NkTP heads outside the decoder's own forward, and
  DistributedDataParallel (`accelerate launch` with several processes) only sees the parameters used inside
  the forward it wraps. Wrapped together, each process's step knows which parameters it used: a raster batch
  uses the NkTP heads, a next-scale batch does not, and the processes draw their orders independently.
- `adamw`: AdamW that decays the weight matrices and embeddings only, as nanoGPT's `configure_optimizers`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from napari_mris.model.decoder import MRISDecoder
from napari_mris.model.sequence import collate
from napari_mris.model.vocab import VocabLayout
from napari_mris_train.het_memory import HETMemory
from napari_mris_train.losses import LossConfig, compute_losses
from napari_mris_train.mixing import Sample, to_device


def collate_samples(samples: list[Sample], device: torch.device | str) -> dict:
    """The padded batch of `samples` on `device`, with each sample's whole mask as the lesion target."""
    batch = collate([s.sequence for s in samples])
    batch["lesion"] = torch.stack([s.lesion for s in samples])
    batch = to_device(batch, device)
    batch["orders"] = [s.sequence.order for s in samples]  # each example's decoding order
    batch["sample_keys"] = [s.key for s in samples]  # its stable id in the HET memory
    return batch


def teacher_forced(decoder: MRISDecoder, batch: dict, **options):
    """The decoder on a collated batch, every position at once (the training layout)."""
    return decoder(
        batch["input_ids"],
        batch["scale_ids"],
        batch["attention_mask"],
        position_ids=batch["position_ids"],
        pixel_values=batch.get("pixel_values"),
        slot_cells=batch["slot_cells"],
        **options,
    )


class Objective(nn.Module):
    """The decoder's forward pass and its training losses (focal NTP, TCL, NkTP, HET, the stem's lesion map)."""

    def __init__(
        self, decoder: MRISDecoder, layout: VocabLayout, losses: LossConfig, memory: HETMemory | None = None
    ) -> None:
        super().__init__()
        self.decoder = decoder
        self.layout, self.losses, self.memory = layout, losses, memory

    def forward(self, batch: dict, het_active: bool = False) -> dict[str, Tensor]:
        """`{"loss": total, <term>: value}` for a batch of `collate_samples`; HET reads and updates the memory."""
        # compute_logits=False: the losses project only the positions they read (losses.logits_at)
        output = teacher_forced(self.decoder, batch, compute_logits=False)
        return compute_losses(
            self.decoder,
            output,
            batch,
            batch["orders"],
            self.layout,
            self.losses,
            sample_keys=batch["sample_keys"],
            memory=self.memory,
            het_active=het_active,
        )


def adamw(
    params: Iterable[nn.Parameter],
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.999),
) -> torch.optim.AdamW:
    """AdamW over the trainable `params`, with weight decay on the >= 2-D ones only.

    Why: decay pulls a weight towards zero. For matrices, convolution kernels and embeddings that is the
    intended regulariser; for biases and norm gains (1-D) it only drags a norm's scale away from 1 and
    shifts offsets, with nothing to regularise (nanoGPT's `configure_optimizers`, GPT-2/3 practice).
    The parameter order inside each group follows `params`, so a checkpoint's moments map back exactly.
    """
    trainable = [p for p in params if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas)
