"""The Llama decoder wrapper: custom block mask honoured, NkTP heads, save/load, LoRA adapters."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from _orders import order_for
from _tiny_decoder import TINY_LAYOUT, one_torch_thread, tiny_decoder_config  # noqa: F401
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file

from napari_mris.adapters import adapter_dir, adapters_folder, adapters_root, list_adapters, save_adapter
from napari_mris.errors import ModelDirectoryError
from napari_mris.model import modeldir
from napari_mris.model.decoder import MRISDecoder, lora_target_modules
from napari_mris.model.decoder_files import load_decoder, save_decoder
from napari_mris.model.sequence import build_training_sequence, collate

LAYOUT = TINY_LAYOUT
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_decoder(seed: int = 0, **overrides) -> MRISDecoder:
    torch.manual_seed(seed)
    return MRISDecoder(tiny_decoder_config(**overrides)).eval()


def scale_batch(last_scale_codes: torch.Tensor):
    codes = [torch.tensor([2]), torch.tensor([0, 1, 2, 3]), last_scale_codes]
    seq = build_training_sequence(order_for(LAYOUT, "scale", (1, 2, 4)), torch.arange(4), [3, 4, 5], 2, codes)
    return seq, collate([seq])


def test_llama_is_the_configured_architecture():
    decoder = tiny_decoder()
    cfg = decoder.llama.config
    assert cfg._attn_implementation == "sdpa"
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # grouped-query attention
    assert cfg.hidden_act == "silu" and not cfg.tie_word_embeddings
    assert decoder.llama.lm_head.weight.data_ptr() != decoder.llama.model.embed_tokens.weight.data_ptr()
    assert len(decoder.nktp_heads) == 3
    assert not decoder.scale_embed.weight[0].any()


def test_custom_block_mask_is_honoured():
    """A change in a later block leaves earlier outputs alone; slots of one block see each other."""
    decoder = tiny_decoder()
    seq, batch = scale_batch(torch.zeros(16, dtype=torch.long))
    ids = batch["input_ids"]
    s2 = int((seq.scale_ids == 2).nonzero()[0])  # first slot of scale 2 (4 slots), then scale 3 (16 slots)
    s3 = s2 + 4
    assert seq.block_ids[s2:s3].tolist() == [s2] * 4
    other_code = LAYOUT.mask_ids("scale", [5])[0]
    with torch.no_grad():
        base = decoder(ids, scale_ids=batch["scale_ids"], attention_mask=batch["attention_mask"]).logits

        # 1. change the input of the last scale-3 slot: nothing before scale 3 may move, all of scale 3 does
        changed = ids.clone()
        changed[0, -1] = other_code
        out = decoder(changed, scale_ids=batch["scale_ids"], attention_mask=batch["attention_mask"]).logits
        assert torch.equal(out[0, :s3], base[0, :s3])
        assert (out[0, s3:] != base[0, s3:]).any(dim=-1).all()

        # 2. change the last scale-2 slot: its first slot sees it (a causal mask would hide it)
        changed = ids.clone()
        changed[0, s3 - 1] = other_code
        out = decoder(changed, scale_ids=batch["scale_ids"], attention_mask=batch["attention_mask"]).logits
        assert torch.equal(out[0, :s2], base[0, :s2])
        assert (out[0, s2:] != base[0, s2:]).any(dim=-1).all()

        # 3. with the plain causal mask the outputs differ: the custom mask really is used
        causal = decoder(ids, scale_ids=batch["scale_ids"]).logits
        torch.testing.assert_close(causal[0, :s2], base[0, :s2])
        assert (causal[0, s2 : s3 - 1] != base[0, s2 : s3 - 1]).any(dim=-1).all()


def test_padding_rows_give_finite_logits():
    decoder = tiny_decoder()
    seq, _ = scale_batch(torch.zeros(16, dtype=torch.long))
    short = build_training_sequence(order_for(LAYOUT, "raster", (2,)), torch.arange(4), [3], 2, None)
    batch = collate([seq, short])
    with torch.no_grad():
        padded = decoder(batch["input_ids"], scale_ids=batch["scale_ids"], attention_mask=batch["attention_mask"])
        alone = decoder(short.input_ids[None])
    assert torch.isfinite(padded.logits).all()
    torch.testing.assert_close(padded.logits[1, : len(short)], alone.logits[0], atol=1e-5, rtol=1e-5)


def test_hidden_states_are_what_the_lm_head_sees_and_nktp_heads_start_as_it():
    decoder = tiny_decoder()
    ids = torch.randint(0, LAYOUT.vocab_size, (2, 9))
    with torch.no_grad():
        out = decoder(ids)
        torch.testing.assert_close(decoder.llama.lm_head(out.hidden_states), out.logits)
        mask = slice(*LAYOUT.mask_range("raster"))
        head = decoder.nktp_logits(out.hidden_states, 3, mask)  # zero-initialised: the next-token head, sliced
        torch.testing.assert_close(head, out.logits[..., mask])
        decoder.nktp_heads[1].linear.weight.normal_()
        assert not torch.allclose(decoder.nktp_logits(out.hidden_states, 3, mask), out.logits[..., mask])
    with pytest.raises(ValueError, match="offset must be in 2..4"):
        decoder.nktp_logits(out.hidden_states, 5)


def test_bool_mask_is_refused():
    decoder = tiny_decoder()
    with pytest.raises(ValueError, match="additive float"):
        decoder(torch.zeros(1, 3, dtype=torch.long), attention_mask=torch.ones(1, 1, 3, 3, dtype=torch.bool))


def test_save_load_round_trip(tmp_path):
    decoder = tiny_decoder()
    save_decoder(decoder, LAYOUT, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["decoder"]["hidden_size"] == 32 and config["nktp_k"] == 4
    assert config["vocab"]["vocab_size"] == LAYOUT.vocab_size
    loaded, layout = load_decoder(tmp_path)
    assert layout == LAYOUT and not loaded.training
    ids = torch.randint(0, LAYOUT.vocab_size, (1, 12))
    scale_ids = torch.randint(0, 4, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, scale_ids).logits, decoder(ids, scale_ids).logits, rtol=0, atol=0)
    for key, value in decoder.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_mismatched_or_missing_weights_name_the_file(tmp_path):
    save_decoder(tiny_decoder(), LAYOUT, tmp_path)
    other = tmp_path / "other"
    save_decoder(tiny_decoder(hidden_size=48), LAYOUT, other)
    (tmp_path / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    with pytest.raises(ModelDirectoryError, match=r"model\.safetensors does not match config\.json"):
        load_decoder(tmp_path)

    state = {k: v for k, v in tiny_decoder().state_dict().items() if "nktp" not in k}
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelDirectoryError, match=r"model\.safetensors does not match.*missing.*nktp_heads"):
        load_decoder(tmp_path)

    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ModelDirectoryError, match="model.safetensors is missing"):
        load_decoder(tmp_path)


def test_config_sections_are_checked(tmp_path):
    save_decoder(tiny_decoder(), LAYOUT, tmp_path)
    config = modeldir.read_config(tmp_path)
    config["decoder"]["vocab_size"] = 5
    modeldir.write_config(tmp_path, config)
    with pytest.raises(ModelDirectoryError, match="config.json: the vocab section gives"):
        load_decoder(tmp_path)
    modeldir.write_config(tmp_path, {"model_id": "x"})
    with pytest.raises(ModelDirectoryError, match="no 'decoder' section"):
        load_decoder(tmp_path)


def make_adapter(model_dir, name: str) -> torch.Tensor:
    """Attach a LoRA adapter with non-zero weights, save it, return its logits on fixed ids."""
    decoder, _ = load_decoder(model_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=lora_target_modules(), lora_dropout=0.0)
    decoder.llama = get_peft_model(decoder.llama, config)
    torch.manual_seed(1)
    with torch.no_grad():
        for param_name, param in decoder.llama.named_parameters():
            if "lora_B" in param_name:
                param.normal_(std=0.2)
    save_adapter(decoder.llama, model_dir, name)
    with torch.no_grad():
        return decoder(torch.arange(10)[None] + 80).logits


def test_lora_adapter_loads_merged_and_is_refused_on_another_base(tmp_path, monkeypatch):
    monkeypatch.setenv("NAPARI_MRIS_ADAPTERS", str(tmp_path / "user"))
    model_dir = tmp_path / "model"
    base = tiny_decoder()
    save_decoder(base, LAYOUT, model_dir)
    adapted_logits = make_adapter(model_dir, "corrections")
    folder = adapters_folder(model_dir) / "corrections"
    assert folder.parent == tmp_path / "user" / modeldir.model_hash(model_dir)[:16]  # per user, keyed by hash
    assert {"adapter_model.safetensors", "adapter_config.json", "base_model.json"} <= {p.name for p in folder.iterdir()}
    assert not list(folder.glob("*.bin")) and not (model_dir / "adapters").exists()
    assert list_adapters(model_dir) == ["corrections"]

    merged, _ = load_decoder(model_dir, adapter="corrections")
    assert not any("lora" in name for name, _ in merged.named_parameters())  # merged into plain Linear layers
    with torch.no_grad():
        ids = torch.arange(10)[None] + 80
        torch.testing.assert_close(merged(ids).logits, adapted_logits, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(base(ids).logits, adapted_logits, atol=1e-3)

    with pytest.raises(ModelDirectoryError, match="adapter 'nope' not found.*available: \\['corrections'\\]"):
        load_decoder(model_dir, adapter="nope")
    with pytest.raises(ModelDirectoryError, match="invalid adapter name"):
        adapter_dir(model_dir, "../escape")

    save_decoder(tiny_decoder(seed=5), LAYOUT, model_dir)  # new base weights: a new hash, no adapters yet
    assert list_adapters(model_dir) == []
    shutil.copytree(folder, adapters_folder(model_dir) / "corrections")  # copied by hand under the new hash
    with pytest.raises(ModelDirectoryError, match="was trained on base model .* retrain the adapter"):
        load_decoder(model_dir, adapter="corrections")


def test_adapters_root_is_the_user_data_folder_unless_overridden(monkeypatch, tmp_path):
    from platformdirs import user_data_path

    monkeypatch.delenv("NAPARI_MRIS_ADAPTERS")
    assert adapters_root() == user_data_path("napari-mris", appauthor=False) / "adapters"
    monkeypatch.setenv("NAPARI_MRIS_ADAPTERS", str(tmp_path))
    assert adapters_root() == tmp_path
