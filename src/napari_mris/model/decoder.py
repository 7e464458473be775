"""The decoder: a small `transformers.LlamaForCausalLM` plus a scale embedding and NkTP heads.

Llama (RMSNorm, grouped-query attention, SwiGLU, rotary positions) is the paper's architecture; here it is
sized by `DecoderConfig` to train on a CPU and scaled up by config on a GPU. Around it:

- `scale_embed`: a learned embedding added to the input of next-scale slots (`scale_ids` = k for scale k,
  0 = none; row 0 stays zero), so the slots of different scales are told apart.
- `pixel_stem` (optional, `pixel_channels`): a convolutional stem whose features are added to the image
  token embeddings, so the decoder sees the pixels the image codes dropped (pixel_stem.py). With
  `pixel_decoder_channels` the stem is a U-Net whose text-free lesion map training fits to the mask (an
  auxiliary target that teaches it lesion texture directly).
- `nktp_heads`: for offsets j = 2..k, a zero-initialised residual block (Medusa) whose output goes through
  the SHARED `lm_head`. They are trained to predict the token j steps ahead (NkTP) and propose tokens for
  self-speculative decoding. `nktp_logits` can slice the unembedding to the mask codes, so 15 heads cost
  15 x (hidden x K) rather than 15 x (hidden x vocab).
- `cell_features` (optional, needs the stem): the position that predicts mask code i also gets the stem's
  feature of that code's cell added to its input (`slot_cells`, see `orders.code_cells`), so a mask
  position reads its own patch of the image instead of having to find it by attention; with a lesion map,
  also that cell's patch of lesion probabilities (`cell_patch_proj`).

Embeddings are untied (`tie_word_embeddings=False`): the same id means different things as an input slot
(an upsampled coarser code) and as an output (a code of this scale), and untied weights keep the
safetensors file free of shared tensors and the LoRA merge simple.
"""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from napari_mris.model.orders import grid_of_cell
from napari_mris.model.pixel_stem import PixelStem
from napari_mris.model.sequence import IMAGE_START
from napari_mris.model.vocab import BOS, EOS, PAD

CELL_POSITION_FREQUENCIES = 4  # octaves of the (row, column) code: half the image down to 1/16 of it


@dataclass
class DecoderConfig:
    """Architecture of the decoder; stored as the `decoder` section of config.json."""

    vocab_size: int
    hidden_size: int = 256
    num_hidden_layers: int = 6
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    intermediate_size: int = 704
    max_position_embeddings: int = 1024
    dropout: float = 0.1
    nktp_k: int = 16
    n_scales: int = 8
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    pixel_channels: list[int] = field(default_factory=list)  # stride-2 stages of the pixel stem; [] = none
    text_slots: int = 0  # RoPE positions given to the text whatever its length (orders.position_shift); 0 = plain
    cell_features: bool = False  # add the stem feature of its own cell to each mask position (orders.code_cells)
    pixel_decoder_channels: list[int] = field(default_factory=list)  # U-Net up-stages of the stem; [] = no lesion map
    cell_positions: bool = False  # add each cell's (row, column) code to its cell feature (cell_position_codes)

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by {self.num_attention_heads} heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.nktp_k < 1:
            raise ValueError(f"nktp_k must be >= 1 (1 = no extra heads), got {self.nktp_k}")
        if self.n_scales < 0:
            raise ValueError(f"n_scales must be >= 0, got {self.n_scales}")
        if self.cell_features and not self.pixel_channels:
            raise ValueError("cell_features adds pixel-stem features: it needs pixel_channels")
        if self.cell_positions and not self.cell_features:
            raise ValueError("cell_positions adds to the cell features: it needs cell_features")
        if self.pixel_decoder_channels and len(self.pixel_decoder_channels) >= len(self.pixel_channels):
            raise ValueError(
                f"pixel_decoder_channels {self.pixel_decoder_channels} need more pixel_channels stages to "
                f"climb back through than {self.pixel_channels}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DecoderConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown decoder settings {unknown}")
        return cls(**data)

    def llama_config(self) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            hidden_act="silu",
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.rms_norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            attention_dropout=self.dropout,
            tie_word_embeddings=False,
            pad_token_id=PAD,
            bos_token_id=BOS,
            eos_token_id=EOS,
            attn_implementation="sdpa",
        )


@dataclass
class DecoderOutput:
    logits: torch.Tensor | None  # [B, Q, V] (or the last `logits_to_keep` positions); None if not computed
    hidden_states: torch.Tensor  # [B, Q, H], last layer after the final RMSNorm (what lm_head sees)
    past_key_values: Any  # transformers Cache when use_cache, else None
    lesion_logits: torch.Tensor | None = None  # [B, 1, h, w] the U-Net stem's lesion map, when computed
    pixel_features: torch.Tensor | None = None  # [B, g*g, H] the stem's features, when computed


class ResidualBlock(nn.Module):
    """Medusa head body: x + SiLU(W x + b), zero-initialised so a new head starts as the next-token head."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.silu(self.linear(x))


class MRISDecoder(nn.Module):
    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.config = config
        self.llama = LlamaForCausalLM(config.llama_config())
        self.scale_embed = nn.Embedding(config.n_scales + 1, config.hidden_size, padding_idx=0)
        nn.init.normal_(self.scale_embed.weight, std=0.02)
        with torch.no_grad():
            self.scale_embed.weight[0].zero_()
        self.nktp_heads = nn.ModuleList(ResidualBlock(config.hidden_size) for _ in range(config.nktp_k - 1))
        self.pixel_stem = None
        self.cell_patch_proj = None  # a cell's patch of lesion-map probabilities -> its cell feature
        self.cell_position_proj = None  # a cell's (row, column) code -> its cell feature; zero at initialisation
        if config.cell_positions:
            self.cell_position_proj = nn.Linear(4 * CELL_POSITION_FREQUENCIES, config.hidden_size)
            nn.init.zeros_(self.cell_position_proj.weight)
            nn.init.zeros_(self.cell_position_proj.bias)
        if config.pixel_channels:
            self.pixel_stem = PixelStem(config.pixel_channels, config.hidden_size, config.pixel_decoder_channels)
            if config.pixel_decoder_channels and config.cell_features:
                self.cell_patch_proj = nn.Linear(self.pixel_stem.map_upsample**2, config.hidden_size)
                nn.init.normal_(self.cell_patch_proj.weight, std=0.02)

    def base_llama(self) -> LlamaForCausalLM:
        """The LlamaForCausalLM, also when `self.llama` is wrapped in a peft model during fine-tuning."""
        get_base = getattr(self.llama, "get_base_model", None)
        return get_base() if callable(get_base) else self.llama

    @property
    def lm_head(self) -> nn.Linear:
        return self.base_llama().lm_head

    def forward(
        self,
        input_ids: torch.Tensor,
        scale_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Any = None,
        use_cache: bool = False,
        position_ids: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        pixel_values: torch.Tensor | None = None,
        compute_logits: bool = True,
        slot_cells: torch.Tensor | None = None,
        cell_table: torch.Tensor | None = None,
        vocab_slice: slice | None = None,
    ) -> DecoderOutput:
        """Logits and final hidden states; `attention_mask` is None (causal) or additive float [B, 1, Q, K].

        `pixel_values` (B, 1, S, S), the preprocessed slice, is required by a decoder with a pixel stem on
        every call that starts a sequence (training, or the prefill before the KV cache exists); a decoder
        without one ignores it. `compute_logits=False` skips `lm_head`: training projects only the positions
        and vocabulary slices its losses read. `vocab_slice` projects onto those ids only (logit i is id
        `vocab_slice.start + i`): a decode loop that may emit only mask codes skips the rest of the head.
        `slot_cells` [B, Q] (-1 = none) names the cell whose stem feature each position gets (cell_features
        decoders only; others ignore it); the features come from `pixel_values` or, on cached steps, from the
        `cell_table` the prefill returned.
        """
        llama = self.base_llama()
        embeds = llama.get_input_embeddings()(input_ids)
        if scale_ids is not None:
            embeds = embeds + self.scale_embed(scale_ids)
        features, lesion_logits = self._stem(pixel_values, starts_sequence=not _cache_length(past_key_values))
        if features is not None:
            embeds = _add_at_image_tokens(embeds.to(features.dtype), features)
        if self.config.cell_features:
            if features is not None:
                largest = grid_of_cell(int(slot_cells.max())) if slot_cells is not None and slot_cells.numel() else 1
                cell_table = self.cell_table(features, largest, lesion_logits)
            if slot_cells is not None and bool((slot_cells >= 0).any()):
                if cell_table is None:
                    raise ValueError("slot_cells need the stem's cell features: pass pixel_values or cell_table")
                embeds = embeds + _gather_cells(cell_table.to(embeds.dtype), slot_cells)
        if attention_mask is not None:
            if attention_mask.dim() != 4:
                raise ValueError(
                    f"attention_mask must be additive float [B, 1, Q, K], got shape {tuple(attention_mask.shape)}"
                )
            if attention_mask.dtype == torch.bool:
                raise ValueError(
                    "attention_mask must be additive float (0 = attend, large negative = blocked), not bool"
                )
            attention_mask = attention_mask.to(embeds.dtype)
        cache_name = cache_keyword(type(llama.model))
        out = llama.model(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            use_cache=use_cache,
            position_ids=position_ids,
            **{cache_name: past_key_values},
        )
        hidden = out.last_hidden_state
        logits = None
        if compute_logits:
            logits = self.unembed(hidden[:, -logits_to_keep:] if logits_to_keep else hidden, vocab_slice)
        past = getattr(out, cache_name) if use_cache else None
        return DecoderOutput(logits, hidden, past, lesion_logits, features)

    def cell_table(self, features: torch.Tensor, largest: int, lesion_map: torch.Tensor | None = None) -> torch.Tensor:
        """(B, g*g, H) stem features -> (B, cells, H): the features area-pooled to every grid 1x1 .. GxG in
        turn (`orders.code_cells`), G = max(`largest`, g); with `cell_patch_proj`, plus each cell's patch
        of the (B, 1, g*u, g*u) lesion map's probabilities, area-pooled to u x u (u = map_upsample)."""
        batch, n, hidden = features.shape
        grid = math.isqrt(n)
        sizes = range(1, max(largest, grid) + 1)
        square = features.transpose(1, 2).reshape(batch, hidden, grid, grid)
        table = torch.cat([F.adaptive_avg_pool2d(square, s).flatten(2) for s in sizes], dim=2).transpose(1, 2)
        if self.cell_position_proj is not None:
            codes = cell_position_codes(sizes).to(device=table.device, dtype=self.cell_position_proj.weight.dtype)
            table = table + self.cell_position_proj(codes).to(table.dtype)
        if self.cell_patch_proj is None:
            return table
        if lesion_map is None:
            raise ValueError("this decoder's cell features read the stem's lesion map: pass lesion_map")
        u = self.pixel_stem.map_upsample
        prob = torch.sigmoid(lesion_map.float()) * 2.0 - 1.0
        patches = [F.unfold(F.adaptive_avg_pool2d(prob, s * u), u, stride=u) for s in sizes]  # (B, u*u, s*s)
        patches = torch.cat(patches, dim=2).transpose(1, 2).to(self.cell_patch_proj.weight.dtype)
        return table + self.cell_patch_proj(patches).to(table.dtype)

    def _stem(
        self, pixel_values: torch.Tensor | None, starts_sequence: bool
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The stem's (B, g*g, hidden) features and its lesion-map logits (None without a U-Net), or
        (None, None): no stem, or a cached step that needs none."""
        if self.pixel_stem is None:  # a token-only decoder: the pixels are not needed
            return None, None
        if pixel_values is None:
            if starts_sequence:
                raise ValueError("this decoder has a pixel stem: pass pixel_values with the image tokens")
            return None, None
        return self.pixel_stem(pixel_values.to(self.pixel_stem.proj.weight.dtype))

    def lesion_logits(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The U-Net stem's text-free (B, 1, h, w) lesion-map logits, no tokens (what the stem warm-up trains)."""
        if self.pixel_stem is None or self.pixel_stem.lesion_map is None:
            raise ValueError("this decoder has no lesion map (decoder.pixel_decoder_channels is empty)")
        return self._stem(pixel_values, starts_sequence=True)[1]

    def nktp_logits(self, hidden_states: torch.Tensor, offset: int, vocab_slice: slice | None = None) -> torch.Tensor:
        """Logits for the token `offset` steps ahead (offset 1 is `lm_head` itself, 2..k are the NkTP heads)."""
        if not 2 <= offset <= self.config.nktp_k:
            raise ValueError(f"NkTP offset must be in 2..{self.config.nktp_k}, got {offset}")
        return self.unembed(self.nktp_heads[offset - 2](hidden_states), vocab_slice)

    def unembed(self, hidden_states: torch.Tensor, vocab_slice: slice | torch.Tensor | None = None) -> torch.Tensor:
        """`lm_head` on [..., H] states: logits over the vocabulary, or over the ids `vocab_slice` (a slice or
        an index tensor) only, computing just those rows of the head. A head whose weight alone is not the
        whole map (wrapped by an adapter, or with forward hooks) runs whole and is sliced after."""
        head = self.lm_head
        if vocab_slice is None:
            return head(hidden_states)
        if type(head) is not nn.Linear or head._forward_hooks or head._forward_pre_hooks:
            return head(hidden_states)[..., vocab_slice]
        bias = None if head.bias is None else head.bias[vocab_slice]
        return F.linear(hidden_states, head.weight[vocab_slice], bias)


def cell_position_codes(sizes: range) -> torch.Tensor:
    """(cells, 4 * CELL_POSITION_FREQUENCIES): sines and cosines of each cell's centre row and column (in
    [0, 1]) for every grid in `sizes`, in the cell table's order (grid by grid, raster within a grid).

    Why: rotary positions tell a mask position its offset along the raster, from which its row is a
    threshold but its column a remainder; a decoder that must map "left" / "right" to columns did not learn
    that (docs/results.md, default v5). A fixed code of (row, column) makes a side a linear feature.
    """
    rows, cols = [], []
    for s in sizes:
        centre = (torch.arange(s, dtype=torch.float32) + 0.5) / s
        rows.append(centre.repeat_interleave(s))
        cols.append(centre.repeat(s))
    angles = (
        torch.stack([torch.cat(rows), torch.cat(cols)], 1)[:, :, None]
        * math.pi
        * 2.0 ** torch.arange(CELL_POSITION_FREQUENCIES, dtype=torch.float32)
    )
    return torch.cat([angles.sin(), angles.cos()], dim=2).flatten(1)


def _add_at_image_tokens(embeds: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Add the (B, g*g, H) pixel features to the embeddings of the image tokens (from `IMAGE_START`)."""
    stop = IMAGE_START + features.shape[1]
    if embeds.shape[0] != features.shape[0] or embeds.shape[1] < stop:
        raise ValueError(
            f"pixel features {tuple(features.shape)} do not fit input embeddings {tuple(embeds.shape)}: "
            f"the image tokens must sit at positions {IMAGE_START}..{stop - 1}"
        )
    return torch.cat([embeds[:, :IMAGE_START], embeds[:, IMAGE_START:stop] + features, embeds[:, stop:]], 1)


def _gather_cells(table: torch.Tensor, slot_cells: torch.Tensor) -> torch.Tensor:
    """(B, Q, H): row `slot_cells[b, q]` of `table[b]`, zero where `slot_cells` is -1."""
    if slot_cells.shape[0] != table.shape[0]:
        table = table.expand(slot_cells.shape[0], -1, -1)  # samples or beams share one slice's features
    index = slot_cells.clamp(min=0)[..., None].expand(-1, -1, table.shape[-1])
    return torch.gather(table, 1, index) * (slot_cells >= 0)[..., None].to(table.dtype)


@functools.cache
def cache_keyword(model_class: type) -> str:
    """The name under which `model_class.forward` takes (and its output returns) the transformers `Cache`:
    `cache` in transformers 5 releases that renamed it (`past_key_values` still works there but warns a
    FutureWarning on every call), `past_key_values` in the releases before."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def _cache_length(past_key_values: Any) -> int:
    return 0 if past_key_values is None else int(past_key_values.get_seq_length())


def lora_target_modules() -> list[str]:
    """The Llama projections LoRA adapts (attention and SwiGLU MLP)."""
    return ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
