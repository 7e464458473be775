"""A small model directory for the pipeline, widget, CLI and screenshot tests, built once per session.

The tests here check plumbing (shapes, streaming, threading, layers, files), not accuracy, so the training
package's tiny model (trained for seconds on phantoms) is enough. Because such a model answers [SOV] or
[REJ] close to at random, `force_decision` pins the presence decision with a forward hook on the decoder:
a test that needs a mask forces [SOV], the [REJ] test forces [REJ].
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from napari_mris.pipeline import DecodingSettings, StreamUpdate


def build_model(out_dir: Path) -> Path:
    """The training package's tiny model (phantoms, tiny.yaml; about a minute on a busy 2-core machine).

    `MRIS_TINY_MODEL=DIR` reuses a model directory built earlier (`python -m napari_mris_train.tiny DIR`),
    which saves the build on every local test run.
    """
    prebuilt = os.environ.get("MRIS_TINY_MODEL")
    if prebuilt:
        return Path(prebuilt)
    from napari_mris_train.tiny import build_tiny_model

    return Path(build_tiny_model(out_dir))


@contextlib.contextmanager
def favour_tokens(pipeline, ids: list[int]) -> Iterator[None]:
    """Add a large logit to `ids` at every output of the model (a forward hook on the decoder, which sees
    which ids its logits cover: the decode loop asks for the mask codes only); the legal-token rules still
    keep each id out where it is not allowed."""
    import dataclasses

    import torch

    favoured = torch.tensor(ids)

    def hook(module, args, kwargs, output):
        if output.logits is None:
            return output
        covered = torch.arange(module.config.vocab_size)[kwargs.get("vocab_slice") or slice(None)]
        bonus = torch.isin(covered, favoured).to(output.logits.dtype).to(output.logits.device) * 1e4
        return dataclasses.replace(output, logits=output.logits + bonus)

    handle = pipeline.decoder.register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def force_decision(pipeline, token: str) -> contextlib.AbstractContextManager[None]:
    """Make the model choose [SOV] (target present) or [REJ] (absent) at the decision position."""
    from napari_mris.model.vocab import REJ, SOV

    return favour_tokens(pipeline, [{"SOV": SOV, "REJ": REJ}[token]])


def force_drawing(pipeline) -> contextlib.AbstractContextManager[None]:
    """Make the model answer [SOV] and write, in every order, the mask code whose patch is the fullest.

    A tiny model often answers "present" and then writes only background codes, which the pipeline
    reports as "not present"; a test that needs a drawn mask from the real decoding path pins both.
    """
    import torch

    from napari_mris.model.vocab import SOV

    favoured = [SOV]
    for order, tokenizer in pipeline.tokenizers.masks.items():
        with torch.inference_mode():
            fullness = [
                float(tokenizer.decode([torch.full((1, s * s), k) for s in tokenizer.scales]).mean())
                for k in range(tokenizer.codebook_size)
            ]
        favoured.append(int(pipeline.layout.mask_ids(order, [int(np.argmax(fullness))])[0]))
    return favour_tokens(pipeline, favoured)


class ScriptedPipeline:
    """A stand-in for MRISPipeline that streams masks chosen by the test (widget logic, not the model).

    `masks` is a list of (H, W) bool arrays, a function of the image shape returning one, or a dict of
    either by prompt (several findings); with `gate`, a stream of more than one update waits after its first
    until the gate opens or the widget asks it to stop.
    """

    model_id = "scripted"
    model_hash = "0123456789abcdef"
    adapter = None
    device = "cpu"
    orders = ("raster", "scale")
    model_dir = Path("scripted")

    def __init__(self, masks, *, rejected=False, uncertainty=None, gate: threading.Event | None = None):
        self.masks = masks
        self.rejected = rejected
        self.uncertainty = uncertainty
        self.gate = gate
        self.calls: list[dict] = []

    def settings(self, order="scale", samples=1, temperature=0.0, beam=1, top_k=None, seed=None, snap=True):
        return DecodingSettings(order, samples, temperature, beam, top_k, seed, snap)

    def stream_findings(self, image, prompts, order="scale", samples=1, window=None, should_stop=None, **_):
        """The script once per finding, in turn, as (index, update); Stop ends the rest too (like the pipeline)."""
        from napari_mris.findings import check_findings

        for index, prompt in enumerate(check_findings(prompts)):
            finished = False
            for update in self.stream(image, prompt, order, samples, window, should_stop):
                finished = update.finished
                yield index, update
            if not finished or (should_stop is not None and should_stop()):
                return

    def stream(self, image, prompt, order="scale", samples=1, window=None, should_stop=None, **_):
        self.calls.append({"shape": image.shape, "prompt": prompt, "order": order, "samples": samples})
        masks = self.masks[prompt] if isinstance(self.masks, dict) else self.masks
        masks = masks(image.shape) if callable(masks) else masks
        for i, mask in enumerate(masks):
            finished = i == len(masks) - 1
            yield StreamUpdate(
                mask=mask,
                probability=mask.astype(np.float32),
                uncertainty=self.uncertainty if finished else None,
                progress=(i + 1) / len(masks),
                tokens_done=i + 1,
                tokens_total=len(masks),
                rejected=self.rejected,
                finished=finished,
                timings={"total_s": 0.01, "tokens_per_s": 100.0},
            )
            if i == 0 and self.gate is not None and not finished:
                while not self.gate.wait(0.01):
                    if should_stop is not None and should_stop():
                        return
