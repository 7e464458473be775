"""LoRA fine-tuning: the saved adapter reproduces the in-memory model, the base weights stay untouched."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from napari_mris.adapters import CALIBRATION, adapter_dir, adapters_folder, list_adapters, save_adapter
from napari_mris.errors import ModelDirectoryError
from napari_mris.model.decoder_files import load_decoder
from napari_mris.model.generate import presence_probabilities
from napari_mris.model.modeldir import file_sha256, model_hash
from napari_mris.pipeline import MRISPipeline, as_plane
from napari_mris_train.cli import main
from napari_mris_train.data import Example, load_split
from napari_mris_train.finetune import MIN_BORDER_GAIN, choose_lesion_threshold, finetune, train_adapter
from napari_mris_train.metrics import dice_iou
from napari_mris_train.tiny import build_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny model of this module's own (trained differently: its own hash, so its own adapters folder)."""
    data = tmp_path_factory.mktemp("data")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="the prompt is")
        model = build_tiny_model(tmp_path_factory.mktemp("model"), data_root=data, tokenizer_steps=0, decoder_steps=2)
    return model, data


def test_saved_adapter_gives_the_in_memory_logits_and_keeps_the_base(tiny):
    model, data = tiny
    weights_before, hash_before = file_sha256(model / "model.safetensors"), model_hash(model)
    tuned, layout = train_adapter(model, data / "Train_Folder", steps=3, lr=5e-2, batch_size=2)
    folder = save_adapter(tuned.llama, model, "roundtrip")
    assert {"adapter_model.safetensors", "adapter_config.json", "base_model.json"} <= {p.name for p in folder.iterdir()}
    assert not list(folder.glob("*.bin")) and not list(folder.glob("*.pt"))  # safetensors only, no pickle
    assert json.loads((folder / "base_model.json").read_text())["base_model_hash"] == hash_before
    merged, _ = load_decoder(model, adapter="roundtrip")
    base, _ = load_decoder(model)
    ids = torch.randint(0, layout.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    pixels = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        in_memory, loaded, original = (m(ids, pixel_values=pixels).logits for m in (tuned, merged, base))
    torch.testing.assert_close(loaded, in_memory, atol=1e-5, rtol=1e-5)
    assert (in_memory - original).abs().max() > 1e-3  # the adapter did change the model
    assert file_sha256(model / "model.safetensors") == weights_before


def test_finetune_reports_progress_and_a_failure_leaves_nothing(tiny):
    model, data = tiny
    calls = []
    folder = finetune(
        model, data / "Train_Folder", "cb", steps=2, batch_size=2, progress_callback=lambda *a: calls.append(a)
    )
    assert folder == adapters_folder(model) / "cb" and folder.is_dir() and list_adapters(model)[0] == "cb"
    assert not (model / "adapters").exists()  # the model directory is never written
    assert [c[:2] for c in calls] == [(1, 2), (2, 2)] and all(c[2] > 0 for c in calls)

    def fail_after_first_step(step, total, loss):  # a fault mid-run (the widget's stop ends the process)
        raise RuntimeError(f"stopped after step {step}")

    with pytest.raises(RuntimeError, match="after step 1"):
        finetune(model, data / "Train_Folder", "stopped", 5, batch_size=2, progress_callback=fail_after_first_step)
    assert not [p.name for p in adapters_folder(model).iterdir() if "stopped" in p.name]
    with pytest.raises(ModelDirectoryError, match="invalid adapter name"):  # before any training step
        finetune(model, data / "Train_Folder", str(data / "elsewhere" / "x"), steps=1)


def test_cli_finetune_with_replay(tiny):
    model, data = tiny
    rc = main(
        [
            "finetune",
            "--model",
            str(model),
            "--data",
            str(data / "Val_Folder"),
            "--out",
            "cli",
            "--steps",
            "1",
            "--batch-size",
            "2",
            "--replay-data",
            str(data),
            "--replay-fraction",
            "0.5",
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    decoder, _ = load_decoder(model, adapter="cli")
    assert not any(name.startswith("base_model") for name, _ in decoder.named_parameters())  # merged, plain Llama


def test_with_an_adapter_the_base_model_decides_presence(tiny):
    """The adapter draws, the base decides "not present": with an adapter loaded, every finding's p([REJ])
    is the base model's, although the adapted decoder's own differs (so the test can fail)."""
    model, data = tiny
    tuned, _ = train_adapter(model, data / "Train_Folder", steps=3, lr=5e-2, batch_size=2)
    save_adapter(tuned.llama, model, "decides")
    base, adapted = (
        MRISPipeline.from_pretrained(model, device="cpu"),
        MRISPipeline.from_pretrained(model, device="cpu", adapter="decides"),
    )
    assert adapted.presence_decoder is not None and base.presence_decoder is None
    assert adapted.info()["presence_decided_by"] == "base model" and base.info()["presence_decided_by"] == "model"
    example = load_split(data / "Val_Folder")[0]
    prompts = [example.description, "Unilateral pulmonary infection, one infected area, upper left lung."]
    order = base.default_order
    one = [adapted.segment(example.image, prompt, order=order) for prompt in prompts]
    together = adapted.segment_findings(example.image, prompts, order=order)
    reference = base.segment_findings(example.image, prompts, order=order)
    for alone, batched, plain in zip(one, together, reference, strict=True):
        assert alone.reject_probability == pytest.approx(plain.reject_probability, abs=1e-5)
        assert batched.reject_probability == pytest.approx(plain.reject_probability, abs=1e-5)
    image = adapted._image_part(as_plane(example.image), None)
    texts = [adapted.layout.text_ids(torch.as_tensor(adapted._encode_prompt(p)[0])) for p in prompts]
    own = presence_probabilities(adapted.decoder, adapted.decoding_orders[order], image.prefill, texts)
    assert max(abs(a - r.reject_probability) for a, r in zip(own, reference, strict=True)) > 1e-4


class _Maps:
    """A stand-in pipeline whose lesion map is given (choose_lesion_threshold only asks for the map)."""

    def __init__(self, maps):
        self.maps = {id(image): probability for image, probability in maps}

    def lesion_map(self, image):
        return self.maps[id(image)]


def test_the_border_cut_is_chosen_on_the_corrections():
    """Masks drawn at the map's 0.8 (a tighter annotator) choose 0.8, at its 0.3 choose 0.3; masks that
    match the map at 0.5, or a cut that gains less than MIN_BORDER_GAIN, keep 0.5."""
    ramp = np.tile(np.linspace(0, 1, 1000, dtype=np.float32), (4, 1))  # the cut sets where the mask starts
    images = [np.zeros((4, 1000), np.uint8) for _ in range(3)]
    pipeline = _Maps([(image, ramp) for image in images])

    def drawn_at(cut):
        return [Example(f"c{k}", image, ramp >= cut, "finding") for k, image in enumerate(images)]

    assert choose_lesion_threshold(pipeline, drawn_at(0.8)) == 0.8
    assert choose_lesion_threshold(pipeline, drawn_at(0.3)) == 0.3
    assert choose_lesion_threshold(pipeline, drawn_at(0.5)) == 0.5
    nearly = drawn_at(0.553)
    dice = {cut: dice_iou(ramp >= cut, nearly[0].mask)[0] for cut in (0.5, 0.6)}
    assert 0 < dice[0.6] - dice[0.5] < MIN_BORDER_GAIN  # 0.6 fits better, but not by a Dice point
    assert choose_lesion_threshold(pipeline, nearly) == 0.5
    assert choose_lesion_threshold(_Maps([(image, None) for image in images]), drawn_at(0.8)) == 0.5  # no map


def test_the_adapter_carries_its_border_and_the_pipeline_draws_with_it(tiny):
    """finetune saves the chosen cut with the adapter; loading the adapter draws with it; --keep-border and a
    damaged calibration behave as documented."""
    model, data = tiny
    folder = finetune(model, data / "Train_Folder", "border", steps=1, batch_size=2)
    saved = json.loads((folder / CALIBRATION).read_text())["lesion_threshold"]
    assert 0 < saved < 1
    assert MRISPipeline.from_pretrained(model, device="cpu", adapter="border").lesion_threshold == saved
    assert MRISPipeline.from_pretrained(model, device="cpu").lesion_threshold == 0.5

    (folder / CALIBRATION).write_text(json.dumps({"lesion_threshold": 0.7}))
    pipeline = MRISPipeline.from_pretrained(model, device="cpu", adapter="border")
    assert pipeline.lesion_threshold == 0.7 and pipeline.info()["lesion_threshold"] == 0.7
    (folder / CALIBRATION).unlink()  # an adapter saved before calibrations existed: the default cut
    assert MRISPipeline.from_pretrained(model, device="cpu", adapter="border").lesion_threshold == 0.5
    for damaged in ('{"lesion_threshold": 1.5}', '{"lesion_threshold": true}', "{not json", "{}"):
        (folder / CALIBRATION).write_text(damaged)
        with pytest.raises(ModelDirectoryError, match="lesion_threshold"):
            MRISPipeline.from_pretrained(model, device="cpu", adapter="border")

    args = ["finetune", "--model", str(model), "--data", str(data / "Train_Folder"), "--out", "kept"]
    assert main([*args, "--steps", "1", "--batch-size", "2", "--keep-border", "--device", "cpu"]) == 0
    assert json.loads((adapter_dir(model, "kept") / CALIBRATION).read_text()) == {"lesion_threshold": 0.5}
