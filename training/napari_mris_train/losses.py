"""The NTP-MRISeg losses: focal next-token, NkTP, TCL and HET.

Every function here works on logits already restricted to the legal vocabulary of the target (for mask
tokens: the mask codes of that order), so the softmax is over the tokens the decoder may actually emit.
`compute_losses` maps a decoder output and a collated batch onto these functions; each term has a switch
so the paper's ablation (baseline, +TCL, +NkTP, +HET) can be re-run from the CLI.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from napari_mris.model.orders import ORDER_CLASSES
from napari_mris.model.vocab import REJ, SOV, VocabLayout
from napari_mris_train.het_memory import HETMemory

IGNORE = -100


@dataclass
class LossConfig:
    focal_alpha: float = 1.0
    focal_gamma: float = 2.0
    tcl: bool = True
    tcl_weight: float = 0.5  # lambda1
    tcl_negatives: int = 16  # m, preceding target tokens used as negatives
    nktp: bool = True
    nktp_weight: float = 0.5  # lambda2
    het: bool = True
    het_weight: float = 0.5  # lambda3
    het_start: float = 0.6  # fraction of training after which HET is switched on
    het_l: int = 50  # l: remembered tokens used per position (l/2 highest + l/2 lowest)
    het_memory: int = 64  # remembered tokens per (sample, position)
    het_max_keys: int = 200_000  # bound on the number of (sample, position) entries
    decision_weight: float = 1.0  # weight of the one [SOV]/[REJ] decision token against each mask token
    lesion_weight: float = 1.0  # auxiliary: the U-Net pixel stem's lesion map against the mask


# --- the per-token terms -------------------------------------------------------------------------------


def focal_from_log_p(log_p: Tensor, alpha: float, gamma: float) -> Tensor:
    """`-alpha (1 - p)^gamma log p`, per token, from the log-probability of the target."""
    p = log_p.exp()
    return -alpha * (1.0 - p).clamp(min=0.0).pow(gamma) * log_p


def focal_loss(logits: Tensor, targets: Tensor, alpha: float, gamma: float) -> Tensor:
    """Per-token focal loss (N,) from logits (N, C) and targets (N,).

    The cross-entropy is taken per token first and `p = exp(-ce)`; averaging the CE before the focal
    factor (a common bug) would weight every token by the batch's mean confidence instead of its own.
    """
    ce = F.cross_entropy(logits.float(), targets, reduction="none")
    return focal_from_log_p(-ce, alpha, gamma)


def preceding_negatives(targets: Tensor, m: int) -> Tensor:
    """For a target sequence (L,), the m preceding targets of each position as (L, m), -1 where unused.

    Negatives are distinct and never equal to the position's own target (CT loss of Jiang et al. 2022).
    """
    length = targets.shape[0]
    idx = torch.arange(length, device=targets.device)[:, None] - torch.arange(m, 0, -1, device=targets.device)
    neg = torch.where(idx >= 0, targets[idx.clamp(min=0)], torch.full_like(idx, -1))
    neg = neg.masked_fill(neg == targets[:, None], -1)
    earlier_same = (neg[:, :, None] == neg[:, None, :]) & torch.ones(m, m, dtype=torch.bool, device=neg.device).tril(-1)
    return neg.masked_fill(earlier_same.any(-1), -1)


def tcl_loss(logits: Tensor, targets: Tensor, negatives: Tensor, alpha: float, gamma: float) -> Tensor:
    """Focal contrastive token loss, mean over positions that have at least one negative.

    `p_ct = exp(z_y) / (exp(z_y) + sum_neg exp(z_neg))`, then `-alpha (1 - p_ct)^gamma log p_ct`.
    """
    logits = logits.float()
    has_neg = (negatives >= 0).any(-1)
    if not has_neg.any():
        return logits.sum() * 0.0
    z, y, neg = logits[has_neg], targets[has_neg], negatives[has_neg]
    z_pos = z.gather(1, y[:, None])
    z_neg = z.gather(1, neg.clamp(min=0)).masked_fill(neg < 0, float("-inf"))
    log_p_ct = z_pos[:, 0] - torch.logsumexp(torch.cat([z_pos, z_neg], dim=1), dim=1)
    return focal_from_log_p(log_p_ct, alpha, gamma).mean()


def het_select(logits: Tensor, targets: Tensor, remembered: Tensor, keep: int) -> Tensor:
    """Choose the hard negatives H (`keep` is the paper's l).

    Among the remembered tokens (N, R; -1 = empty; the target itself never counts), rank by `z[j] - z[y]`
    and keep the keep/2 highest and keep/2 lowest. Returns (N, R) with -1 where a token was dropped.
    """
    valid = (remembered >= 0) & (remembered != targets[:, None])
    count = valid.sum(-1, keepdim=True)
    score = logits.gather(1, remembered.clamp(min=0)) - logits.gather(1, targets[:, None])
    order = score.masked_fill(~valid, float("-inf")).argsort(dim=1, descending=True, stable=True)
    rank = order.argsort(dim=1, stable=True)  # rank of each column among the valid ones (0 = highest)
    half = keep // 2
    kept = valid & ((count <= keep) | (rank < half) | (rank >= count - half))
    return remembered.masked_fill(~kept, -1)


def het_loss(logits: Tensor, targets: Tensor, remembered: Tensor, keep: int) -> Tensor:
    """Hard-example token loss, averaged over currently mispredicted positions.

    `l_het = -log(exp(z_y) / (exp(z_y) + sum_H exp(z_j)))`; a mispredicted position with nothing
    remembered contributes 0 (its H is empty). Zero when nothing is mispredicted.
    """
    logits = logits.float()
    wrong = logits.argmax(-1) != targets
    if not wrong.any():
        return logits.sum() * 0.0
    z, y = logits[wrong], targets[wrong]
    chosen = het_select(z, y, remembered[wrong], keep)
    z_pos = z.gather(1, y[:, None])
    z_neg = z.gather(1, chosen.clamp(min=0)).masked_fill(chosen < 0, float("-inf"))
    return (torch.logsumexp(torch.cat([z_pos, z_neg], dim=1), dim=1) - z_pos[:, 0]).mean()


# --- mapping a decoder output onto the terms -------------------------------------------------------------


@dataclass
class MaskTargets:
    """The mask-code targets of a batch for one decoding order, flattened over its examples."""

    order: str
    rows: Tensor  # (N,) batch row of each target
    positions: Tensor  # (N,) sequence position whose output predicts it
    codes: Tensor  # (N,) target as a code 0..K-1 of this order
    index: Tensor  # (N,) index of the target inside its example's mask block
    negatives: Tensor  # (N, m) TCL negatives as codes, -1 = none


def gather_mask_targets(batch: dict, orders: list[str], layout: VocabLayout, order: str, m: int) -> MaskTargets | None:
    """Collect the mask-code targets of the examples written in `order` (None if the batch has none)."""
    start, _ = layout.mask_range(order)
    rows, positions, codes, index, negatives = [], [], [], [], []
    for b, (positions_b, order_b) in enumerate(zip(batch["sample_positions"], orders, strict=True)):
        if order_b != order or positions_b.numel() == 0:
            continue
        codes_b = batch["labels"][b, positions_b] - start
        rows.append(torch.full_like(positions_b, b))
        positions.append(positions_b)
        codes.append(codes_b)
        index.append(torch.arange(positions_b.numel(), device=positions_b.device))
        negatives.append(preceding_negatives(codes_b, m))
    if not rows:
        return None
    return MaskTargets(order, *(torch.cat(t) for t in (rows, positions, codes, index)), torch.cat(negatives))


def other_targets(batch: dict, layout: VocabLayout) -> tuple[Tensor, Tensor, Tensor]:
    """Rows, positions and targets of labels that are not mask codes ([SOV]/[REJ] decision, [EOV])."""
    labels = batch["labels"]
    is_mask = torch.zeros_like(labels, dtype=torch.bool)
    for b, positions_b in enumerate(batch["sample_positions"]):
        is_mask[b, positions_b] = True
    rows, positions = torch.nonzero((labels != IGNORE) & ~is_mask, as_tuple=True)
    return rows, positions, labels[rows, positions]


def decision_logits(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Legal vocabulary of a label that is not a mask code: {[SOV], [REJ]} for the decision, else all."""
    is_decision = (targets == SOV) | (targets == REJ)
    z = logits.float()
    restricted = torch.full_like(z, float("-inf"))
    restricted[:, [SOV, REJ]] = z[:, [SOV, REJ]]
    return torch.where(is_decision[:, None], restricted, z), is_decision


def logits_at(decoder, output, rows: Tensor, positions: Tensor, vocab: tuple[int, int] | None = None) -> Tensor:
    """Logits (N, V) at (rows, positions) over the ids `vocab` = [start, stop) (all ids when None).

    Sliced from `output.logits` when the decoder computed them; otherwise projected from the hidden states
    of these positions only. Training asks for the latter: the losses read the mask codes and decisions,
    a fraction of the positions and of the vocabulary, and the full [B, Q, V] logits of the rest would cost
    more than the transformer itself once the mask codebooks are large.
    """
    ids = slice(None) if vocab is None else slice(*vocab)
    if output.logits is not None:
        return output.logits[rows, positions, ids]
    return decoder.unembed(output.hidden_states[rows, positions], ids)


def compute_losses(
    decoder,
    output,
    batch: dict,
    orders: list[str],
    layout: VocabLayout,
    cfg: LossConfig,
    *,
    sample_keys: list[int] | None = None,
    memory: HETMemory | None = None,
    het_active: bool = False,
) -> dict[str, Tensor]:
    """All terms for one batch: `loss = ntp + l1 tcl + l2 nktp + l3 het` plus each term for logging.

    `orders[b]` is the decoding order of example b; `sample_keys[b]` its stable id for the HET memory.
    The memory is read before and updated after the loss, so HET only uses mistakes of earlier steps.
    """
    hidden = output.hidden_states
    per_token, weights = [], []
    zero = hidden.sum() * 0.0
    terms = {"tcl": zero, "nktp": zero, "het": zero}
    n_mask = 0
    for order in layout.orders:
        targets = gather_mask_targets(batch, orders, layout, order, cfg.tcl_negatives)
        if targets is None:
            continue
        start, stop = layout.mask_range(order)
        z = logits_at(decoder, output, targets.rows, targets.positions, (start, stop)).float()
        per_token.append(focal_loss(z, targets.codes, cfg.focal_alpha, cfg.focal_gamma))
        weights.append(torch.ones_like(per_token[-1]))
        share = targets.codes.numel()
        n_mask += share
        if cfg.tcl:
            terms["tcl"] = terms["tcl"] + share * tcl_loss(
                z, targets.codes, targets.negatives, cfg.focal_alpha, cfg.focal_gamma
            )
        if cfg.nktp and ORDER_CLASSES[order].one_code_per_step:  # next-k codes exist in a one-code-per-step order
            terms["nktp"] = terms["nktp"] + nktp_loss(decoder, hidden, targets, (start, stop), cfg)
        if cfg.het and memory is not None and sample_keys is not None:
            terms["het"] = terms["het"] + share * het_term(z, targets, sample_keys, memory, cfg, het_active)
    rows, positions, other = other_targets(batch, layout)
    if other.numel():
        z_other, is_decision = decision_logits(logits_at(decoder, output, rows, positions), other)
        per_token.append(focal_loss(z_other, other, cfg.focal_alpha, cfg.focal_gamma))
        weights.append(torch.where(is_decision, cfg.decision_weight, 1.0))
    per_token, weights = torch.cat(per_token), torch.cat(weights)
    # clamped: with decision_weight 0 (finetune's default) a batch of [REJ] answers only has no weight at all
    terms["ntp"] = (per_token * weights).sum() / weights.sum().clamp(min=1e-12)
    if n_mask:
        terms["tcl"], terms["het"] = terms["tcl"] / n_mask, terms["het"] / n_mask
    loss = terms["ntp"] + cfg.tcl_weight * terms["tcl"] + cfg.nktp_weight * terms["nktp"]
    if het_active:
        loss = loss + cfg.het_weight * terms["het"]
    lesion_logits = getattr(output, "lesion_logits", None)
    if cfg.lesion_weight > 0 and lesion_logits is not None and "lesion" in batch:
        terms["lesion"] = lesion_loss(lesion_logits, batch["lesion"])
        loss = loss + cfg.lesion_weight * terms["lesion"]
    return {"loss": loss, **terms}


def lesion_loss(lesion_logits: Tensor, masks: Tensor) -> Tensor:
    """The text-free lesion target of the U-Net stem's (B, 1, h, w) lesion map, against the whole
    (B, 1, S, S) masks area-pooled to its size: BCE + soft Dice (the U-Net peer's loss,
    benchmarks/unet_baseline.py); Dice keeps the small lesions from drowning in background pixels.
    """
    masks = masks.float().to(lesion_logits.device)
    logits = lesion_logits.float()
    target = F.adaptive_avg_pool2d(masks, logits.shape[-2:])
    prob = torch.sigmoid(logits)
    inter = (prob * target).sum(dim=(1, 2, 3))
    dice = (2 * inter + 1) / (prob.sum(dim=(1, 2, 3)) + target.sum(dim=(1, 2, 3)) + 1)
    return F.binary_cross_entropy_with_logits(logits, target) + (1 - dice).mean()


def nktp_loss(decoder, hidden: Tensor, targets: MaskTargets, vocab: tuple[int, int], cfg: LossConfig) -> Tensor:
    """Mean over offsets j = 2..k of the focal loss of head j on `y[n + j - 1]` (the token j steps ahead).

    The paper writes a sum over heads; with k = 16 that weighs the 15 auxiliary heads 7.5x the main loss
    at lambda2 = 0.5 (measured at initialisation on QaTa-COV19, default recipe: sum 104 vs L_ntp 7.0), and
    the gradient of far-ahead guesses swamps next-token prediction. The mean keeps lambda2 meaningful.

    Raster order only: there the mask block is one run of consecutive positions, so the target j steps
    ahead is the code at block index + j - 1; heads whose target runs past the block are masked.
    """
    per_head = []
    block_length = torch.bincount(targets.rows)[targets.rows]  # entries of one example are contiguous
    for j in range(2, decoder.config.nktp_k + 1):
        valid = targets.index + j - 1 < block_length
        if not valid.any():
            break
        source = torch.nonzero(valid, as_tuple=True)[0]
        h = hidden[targets.rows[source], targets.positions[source]]
        z = decoder.nktp_logits(h, j, slice(*vocab)).float()
        per_head.append(focal_loss(z, targets.codes[source + j - 1], cfg.focal_alpha, cfg.focal_gamma).mean())
    return torch.stack(per_head).mean() if per_head else hidden.sum() * 0.0


def het_term(
    z: Tensor, targets: MaskTargets, sample_keys: list[int], memory: HETMemory, cfg: LossConfig, active: bool
) -> Tensor:
    """HET on one order's targets; the memory learns this step's mistakes after the loss is taken."""
    keys = [(sample_keys[int(r)], int(i)) for r, i in zip(targets.rows, targets.index, strict=True)]
    loss = het_loss(z, targets.codes, memory.lookup(keys).to(z.device), cfg.het_l) if active else z.sum() * 0.0
    predicted = z.detach().argmax(-1)
    wrong = torch.nonzero(predicted != targets.codes, as_tuple=True)[0].tolist()
    memory.update([keys[i] for i in wrong], predicted[wrong].tolist())
    return loss
