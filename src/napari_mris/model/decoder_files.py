"""The decoder in a model directory: `model.safetensors` plus the `decoder` / `vocab` sections of config.json.

Apart from `decoder.py`, which is the model alone, and from `modeldir.py`, which reads and writes any file
of the directory (and which the tokenizers' loader uses too, so it must not import the decoder). A LoRA
adapter is merged on load from the user's adapters folder (`adapters.py`), never from the model directory.
"""

from __future__ import annotations

from pathlib import Path

import torch

from napari_mris.adapters import merged_adapter
from napari_mris.errors import ModelDirectoryError
from napari_mris.model import modeldir
from napari_mris.model.decoder import DecoderConfig, MRISDecoder
from napari_mris.model.vocab import VocabLayout

WEIGHTS_NAME = "model.safetensors"


def save_decoder(decoder: MRISDecoder, layout: VocabLayout, model_dir: str | Path) -> None:
    """Write `model.safetensors` and the `decoder`/`vocab`/`nktp_k` sections of config.json."""
    if decoder.base_llama() is not decoder.llama:
        raise ValueError("save_decoder needs a plain decoder; save a LoRA fine-tune with save_adapter()")
    if layout.vocab_size != decoder.config.vocab_size:
        raise ValueError(f"vocabulary has {layout.vocab_size} ids but the decoder {decoder.config.vocab_size}")
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    modeldir.save_weights(model_dir / WEIGHTS_NAME, decoder.state_dict(), metadata={"format": "pt"})
    modeldir.update_config(
        model_dir, decoder=decoder.config.to_dict(), vocab=layout.to_dict(), nktp_k=decoder.config.nktp_k
    )


def read_decoder_config(model_dir: str | Path) -> tuple[DecoderConfig, VocabLayout]:
    """The decoder and vocabulary sections of config.json, checked against each other."""
    config = modeldir.read_config(model_dir)
    path = Path(model_dir) / modeldir.CONFIG_NAME
    for section in ("decoder", "vocab"):
        if section not in config:
            raise ModelDirectoryError(f"{path} has no '{section}' section; the decoder was never saved here")
    try:
        decoder_config = DecoderConfig.from_dict(config["decoder"])
        layout = VocabLayout.from_dict(config["vocab"])
    except (TypeError, ValueError) as exc:
        raise ModelDirectoryError(f"{path}: invalid decoder/vocab section: {exc}") from exc
    if layout.vocab_size != decoder_config.vocab_size:
        raise ModelDirectoryError(
            f"{path}: the vocab section gives {layout.vocab_size} ids but the decoder has {decoder_config.vocab_size}"
        )
    return decoder_config, layout


def load_decoder(
    model_dir: str | Path, adapter: str | None = None, device: str | torch.device = "cpu"
) -> tuple[MRISDecoder, VocabLayout]:
    """Build the decoder from config.json, load `model.safetensors`, optionally merge a LoRA adapter; eval mode."""
    model_dir = Path(model_dir)
    decoder_config, layout = read_decoder_config(model_dir)
    decoder = MRISDecoder(decoder_config)
    state = modeldir.load_weights(model_dir, WEIGHTS_NAME)
    modeldir.load_state_checked(decoder, state, model_dir / WEIGHTS_NAME)
    if adapter is not None:
        decoder.llama = merged_adapter(decoder.llama, model_dir, adapter)
    return decoder.to(device).eval(), layout
