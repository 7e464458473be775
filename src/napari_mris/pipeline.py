"""`MRISPipeline`: a model directory turned into streamed masks for one slice and one or more prompts.

`stream_findings()` is the one decoding path for the widget, the CLI and the benchmarks: it preprocesses
the slice, encodes the prompts, runs the image part once (image tokens, pixel stem, the image block's KV
cache: `generate.prefill_image`) and then, finding after finding, `autoregressive_infer` on that shared
image part, turning the codes decoded so far into a mask at the slice's own resolution at a throttled rate
(once per scale in coarse-to-fine order, once per completed token row in raster order) because decoding a
mask costs far more than one token. `stream()` is its one-finding case; `segment()` / `segment_findings()`
consume the stream and return the final masks with the provenance an export needs (model id, settings).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from napari_mris.adapters import adapter_lesion_threshold
from napari_mris.domain import DomainCheck, DomainGuard
from napari_mris.errors import ModelDirectoryError, MRISError, UnsupportedImageError
from napari_mris.export import software_versions
from napari_mris.findings import check_findings
from napari_mris.lesion_snap import LESION_THRESHOLD, snap_to_lesion_map
from napari_mris.model.decoder_files import load_decoder
from napari_mris.model.generate import (
    DecodeStep,
    ImagePrefill,
    autoregressive_infer,
    infer_findings,
    prefill_image,
    presence_probabilities,
)
from napari_mris.model.modeldir import read_config, verify_model_dir
from napari_mris.model.orders import DecodingOrder, decoding_order
from napari_mris.model.sequence import image_block_ids, prefix_ids
from napari_mris.model_location import resolve_model_dir
from napari_mris.prompt_check import PromptCheck, PromptVocabulary
from napari_mris.tokenizers import load_tokenizers
from napari_mris.tokenizers.preprocess import resize_probability, to_model_image

ORDER_LABELS = {"scale": "coarse-to-fine", "raster": "raster"}
SAMPLING_TEMPERATURE = 1.0  # used when samples > 1 but no temperature was given: greedy samples would all agree
MAX_SAMPLES = 32


@dataclass(frozen=True)
class DecodingSettings:
    """How the mask tokens are chosen; recorded in every export's sidecar."""

    order: str = "scale"
    samples: int = 1
    temperature: float = 0.0
    beam: int = 1
    top_k: int | None = None
    seed: int | None = None
    snap: bool = True  # finished mask snapped to the stem's lesion map, for a decoder that has one (lesion_snap.py)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class StreamUpdate:
    """The mask as known after some tokens; arrays are at the input slice's resolution."""

    mask: np.ndarray  # bool (H, W)
    probability: np.ndarray | None  # float32 (H, W), mean over samples; None when the target was rejected
    uncertainty: np.ndarray | None  # float32 (H, W), std of the samples' probabilities; None for one sample
    progress: float  # 0..1
    tokens_done: int
    tokens_total: int
    rejected: bool  # the model said the described target is not in the image ([REJ])
    finished: bool
    timings: dict[str, float] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()  # e.g. unknown words, out of domain: for the widget's status line
    domain_score: float | None = None  # distance to the training images (domain.py); None: the model has no guard
    out_of_domain: bool = False  # domain_score above the model's calibrated threshold
    reject_probability: float | None = None  # p([REJ]) at the presence decision: how sure a "not present" is

    @property
    def not_present(self) -> bool:
        """A finished answer "not present": [REJ], or [SOV] with nothing drawn (the snap never fills it)."""
        return bool(self.finished and (self.rejected or not self.mask.any()))


@dataclass
class SegmentationResult:
    """The last update of a stream plus what produced it."""

    mask: np.ndarray
    probability: np.ndarray | None
    uncertainty: np.ndarray | None
    rejected: bool
    finished: bool
    prompt: str
    settings: DecodingSettings
    timings: dict[str, float]
    model_id: str
    model_hash: str
    adapter: str | None
    warnings: tuple[str, ...] = ()
    domain_score: float | None = None
    out_of_domain: bool = False
    reject_probability: float | None = None  # p([REJ]) / (p([SOV]) + p([REJ])) at the model's presence decision

    @property
    def not_present(self) -> bool:
        """The answer "not present": [REJ], or [SOV] with nothing drawn (StreamUpdate.not_present)."""
        return bool(self.rejected or not self.mask.any())

    def provenance(self) -> dict[str, Any]:
        """JSON-ready description of this result (for sidecars and CSV reports)."""
        return {
            "prompt": self.prompt,
            "rejected": self.rejected,
            "not_present": self.not_present,
            "finished": self.finished,
            "model_id": self.model_id,
            "model_hash": self.model_hash,
            "adapter": self.adapter,
            "settings": self.settings.to_dict(),
            "timings": dict(self.timings),
            "domain_score": self.domain_score,
            "out_of_domain": self.out_of_domain,
            "reject_probability": self.reject_probability,
        }


def reject_threshold(config: dict[str, Any], model_dir: Path) -> float:
    """config.json `reject_threshold`: the answer is "not present" when p([REJ]) is above it. Absent: 0.5, the
    more likely of [SOV]/[REJ]; `napari-mris-train presence` calibrates it on a model's own mixed objective."""
    value = config.get("reject_threshold", 0.5)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 < value <= 1.0:
        raise ModelDirectoryError(
            f"{model_dir}/config.json: reject_threshold must be a number in (0, 1], got {value!r}"
        )
    return float(value)


def resolve_device(device: str) -> torch.device:
    """'auto' is CUDA when available, else the CPU; asking for CUDA without one is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MRISError(f"Device {device!r} was requested but this machine has no usable CUDA GPU; use --device cpu")
    if not (device == "cpu" or device.startswith("cuda")):
        raise MRISError(f"Unknown device {device!r}: use auto, cpu or cuda")
    return torch.device(device)


def as_plane(image: np.ndarray) -> np.ndarray:
    """Check that `image` is one grayscale 2D slice and return it as float32."""
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        raise UnsupportedImageError(
            f"The image is RGB(A) {array.shape}; MRIS segments grayscale slices (convert it to grayscale first)"
        )
    if array.ndim == 3:
        raise UnsupportedImageError(
            f"The image is a {array.shape[0]}-plane stack {array.shape}; pick one slice (2D plane) to segment"
        )
    if array.ndim != 2:
        raise UnsupportedImageError(f"Expected a 2D grayscale slice, got an array of shape {array.shape}")
    if min(array.shape) < 2:
        raise UnsupportedImageError(f"The image {array.shape} is too small to segment")
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise UnsupportedImageError(f"The image has non-numeric pixels ({array.dtype})")
    array = array.astype(np.float32, copy=False)
    if not np.isfinite(array).all():
        raise UnsupportedImageError("The image has NaN or infinite pixels; MRIS cannot window it")
    return array


class MRISPipeline:
    """A loaded model directory: tokenizers, decoder and vocabulary layout on one device.

    With a LoRA adapter, `decoder` is the adapted model and `presence_decoder` the base: the base takes the
    presence decision ("not present" or not, against its calibrated `reject_threshold`) and the adapter
    draws the mask. Why: an adapter learns from corrections, which are always present findings, and is not
    taught the decision (finetune.DECISION_WEIGHT), yet its weights move p([REJ]) anyway; on the correction
    loop's benchmark the findings it turned "not present" made up nearly all of what it changed on full
    descriptions (docs/results.md, "Correction loop"). The adapter also brings the lesion map's cut chosen on
    the user's corrections (`lesion_threshold`, lesion_snap.py), where a user's border style lies.
    """

    def __init__(
        self, model_dir: Path, config: dict, tokenizers, decoder, layout, device, adapter, weights_hash, *,
        weights_verified: bool = False, presence_decoder=None, lesion_threshold: float = LESION_THRESHOLD,
    ):  # fmt: skip
        self.model_dir = model_dir
        self.config = config
        self.tokenizers = tokenizers
        self.decoder = decoder
        self.layout = layout
        self.device = device
        self.adapter = adapter
        self.presence_decoder = presence_decoder  # an adapter's base model, which decides presence (above)
        self.lesion_threshold = lesion_threshold  # the lesion map's cut in the final snap (an adapter's own)
        self.model_hash = weights_hash  # covers every file of the model directory (modeldir.model_files)
        self.weights_verified = weights_verified  # True when the files matched the directory's SHA256SUMS
        self.decoding_orders = {  # the model's orders that have a mask tokenizer, in the layout's order
            name: decoding_order(name, layout, tokenizers.masks[name])
            for name in layout.orders
            if name in tokenizers.masks
        }
        # Optional files of the model directory: no file, no check (domain.py, prompt_check.py).
        self.domain_guard = DomainGuard.load(model_dir, getattr(decoder, "pixel_stem", None))
        self.vocabulary = PromptVocabulary.load(model_dir)
        self.reject_threshold = reject_threshold(config, model_dir)  # the presence decision's calibrated cut
        self._domain_cache: tuple[bytes, DomainCheck] | None = None  # the last image's check: once per image

    @classmethod
    def from_pretrained(
        cls, model: str | Path = "default", device: str = "auto", adapter: str | None = None
    ) -> MRISPipeline:
        """Load a model directory ('default' = the packaged model); every file problem is a ModelDirectoryError,
        including a file that does not match the directory's SHA256SUMS manifest."""
        model_dir = resolve_model_dir(model)
        torch_device = resolve_device(device)
        check = verify_model_dir(model_dir)
        config = read_config(model_dir)
        tokenizers = load_tokenizers(model_dir)
        decoder, layout = load_decoder(model_dir, adapter=adapter, device=torch_device)
        decoder.eval()
        base = load_decoder(model_dir, device=torch_device)[0].eval() if adapter is not None else None
        threshold = adapter_lesion_threshold(model_dir, adapter) if adapter is not None else LESION_THRESHOLD
        missing = [order for order in layout.orders if order not in tokenizers.masks]
        if missing:
            raise ModelDirectoryError(f"{model_dir}: the decoder knows orders {missing} but no mask tokenizer for them")
        return cls(
            model_dir, config, tokenizers, decoder, layout, torch_device, adapter, check.model_hash,
            weights_verified=check.verified, presence_decoder=base, lesion_threshold=threshold,
        )  # fmt: skip

    # ------------------------------------------------------------------ description

    @property
    def model_id(self) -> str:
        return str(self.config.get("model_id") or self.model_dir.name)

    @property
    def orders(self) -> tuple[str, ...]:
        return tuple(self.decoding_orders)

    @property
    def default_order(self) -> str:
        """The order the model decodes best (config.json `default_order`, written by training's export),
        else coarse-to-fine when the model has it."""
        preferred = self.config.get("default_order")
        if preferred in self.orders:
            return preferred
        return "scale" if "scale" in self.orders else self.orders[0]

    @property
    def image_size(self) -> int:
        return int(self.tokenizers.image.image_size)

    def info(self) -> dict[str, Any]:
        """Model id, weights hash, device, orders and software versions (for `napari-mris info` and sidecars)."""
        return {
            "model_id": self.model_id,
            "model_hash": self.model_hash,
            "weights_verified": self.weights_verified,
            "model_dir": str(self.model_dir),
            "adapter": self.adapter,
            "device": str(self.device),
            "orders": list(self.orders),
            "image_size": self.image_size,
            "parameters": sum(p.numel() for p in self.decoder.parameters()),
            "versions": software_versions(),
            "domain_threshold": self.domain_guard.threshold if self.domain_guard is not None else None,
            "reject_threshold": self.reject_threshold,
            "presence_decided_by": "base model" if self.presence_decoder is not None else "model",
            "lesion_threshold": self.lesion_threshold,
            "prompt_vocabulary": sorted(self.vocabulary.words) if self.vocabulary is not None else None,
        }

    # ------------------------------------------------------------------ decoding

    def settings(
        self,
        order: str | None = None,
        samples: int = 1,
        temperature: float = 0.0,
        beam: int = 1,
        top_k: int | None = None,
        seed: int | None = None,
        snap: bool = True,
    ) -> DecodingSettings:
        """Validate decoding options against this model (order None = its `default_order`); samples > 1
        implies sampling. `snap` applies only to a decoder with a lesion map (lesion_snap.py)."""
        order = order or self.default_order
        if order not in self.orders:
            names = ", ".join(f"{o} ({ORDER_LABELS.get(o, o)})" for o in self.orders)
            raise MRISError(f"This model cannot decode in {order!r} order; it has: {names}")
        if not 1 <= int(samples) <= MAX_SAMPLES:
            raise MRISError(f"samples must be between 1 and {MAX_SAMPLES}, got {samples}")
        if int(beam) < 1:
            raise MRISError(f"beam must be at least 1, got {beam}")
        if int(beam) > 1 and (int(samples) > 1 or float(temperature) > 0):
            raise MRISError("Beam search is deterministic: use beam > 1 with one sample and temperature 0")
        if int(beam) > 1 and not self.decoding_orders[order].one_code_per_step:
            raise MRISError("Beam search works in raster order only (coarse-to-fine writes a whole scale per step)")
        if float(temperature) < 0:
            raise MRISError(f"temperature must be >= 0, got {temperature}")
        if int(samples) > 1 and float(temperature) == 0.0:
            temperature = SAMPLING_TEMPERATURE
        return DecodingSettings(order, int(samples), float(temperature), int(beam), top_k, seed, bool(snap))

    def stream(self, image: np.ndarray, prompt: str, *args: Any, **options: Any) -> Iterator[StreamUpdate]:
        """Yield the growing mask for `prompt` on the 2D `image`; the last update has finished=True. The
        one-finding case of `stream_findings`, with the same options.

        `should_stop` is polled between decoding steps; when it returns True the stream ends without a
        finished update (the caller keeps the last partial mask or discards it).
        """
        return (update for _, update in self.stream_findings(image, [prompt], *args, **options))

    def stream_findings(
        self,
        image: np.ndarray,
        prompts: Sequence[str],
        order: str | None = None,
        samples: int = 1,
        temperature: float = 0.0,
        beam: int = 1,
        window: tuple[float, float] | None = None,
        *,
        top_k: int | None = None,
        seed: int | None = None,
        snap: bool = True,
        should_stop: Callable[[], bool] | None = None,
    ) -> Iterator[tuple[int, StreamUpdate]]:
        """Several findings of one image, one after the other: yields (index of the finding, update).

        The image part is computed once for all of them; each finding's mask equals what `stream()` gives for
        its prompt alone. The list is checked first (`findings.check_findings`: no empty, repeated or
        surplus finding) and every prompt is encoded before any decoding, so a bad third finding fails
        before the first is drawn. `should_stop` ends the stream, the findings not yet started included.
        """
        settings = self.settings(order, samples, temperature, beam, top_k, seed, snap)
        prompts = check_findings(prompts)
        return self._stream(as_plane(image), prompts, settings, window, should_stop or (lambda: False))

    def segment(self, image: np.ndarray, prompt: str, **options: Any) -> SegmentationResult:
        """Run a stream to its end and return the final mask with its provenance."""
        results = self.segment_findings(image, [prompt], **options)
        if not results:
            raise MRISError("The decoder produced no output")  # only possible with should_stop=lambda: True
        return results[0]

    def segment_findings(self, image: np.ndarray, prompts: Sequence[str], **options: Any) -> list[SegmentationResult]:
        """One result per finding, in the order given (fewer when stopped). Greedy findings are decoded together
        as one batch, without the partial masks a stream draws (the later ones then cost a fraction of the
        first); otherwise this is `stream_findings` run to its end."""
        names = ("order", "samples", "temperature", "beam", "top_k", "seed", "snap")
        settings = self.settings(**{k: options[k] for k in names if k in options})
        prompts = check_findings(prompts)
        if settings.samples == 1 and settings.beam == 1 and settings.temperature == 0:
            return self._segment_together(as_plane(image), prompts, settings, **options)
        last: dict[int, StreamUpdate] = {}
        for index, update in self.stream_findings(image, prompts, **options):
            last[index] = update
        return [self._result(prompts[index], settings, update) for index, update in sorted(last.items())]

    def _result(self, prompt: str, settings: DecodingSettings, last: StreamUpdate) -> SegmentationResult:
        """The last update of a finding, with what produced it."""
        from_update = {f.name: getattr(last, f.name) for f in fields(SegmentationResult) if hasattr(last, f.name)}
        return SegmentationResult(
            **from_update,
            prompt=prompt,
            settings=settings,
            model_id=self.model_id,
            model_hash=self.model_hash,
            adapter=self.adapter,
        )

    def _stream(
        self,
        pixels: np.ndarray,
        prompts: Sequence[str],
        settings: DecodingSettings,
        window: tuple[float, float] | None,
        should_stop: Callable[[], bool],
    ) -> Iterator[tuple[int, StreamUpdate]]:
        start = time.perf_counter()
        encoded = [self._encode_prompt(prompt) for prompt in prompts]  # every prompt checked before any work
        image = self._image_part(pixels, window)
        for index, (text_ids, notes) in enumerate(encoded):
            if should_stop():
                return
            if index:
                start = time.perf_counter()  # a later finding's time is its own: the image part is reused
            for update in self._decode(pixels, image, text_ids, notes, settings, should_stop, start):
                yield index, update
                if update.finished:
                    break
            else:
                return  # stopped inside this finding: the rest are not started

    def _decode(
        self,
        pixels: np.ndarray,
        image: _ImagePart,
        text_ids: list[int],
        notes: tuple[str, ...],
        settings: DecodingSettings,
        should_stop: Callable[[], bool],
        start: float,
    ) -> Iterator[StreamUpdate]:
        """One finding's stream on the shared image part; `start` is when this finding's work began."""
        prefix = prefix_ids(self.layout, image.codes, text_ids, int(self.tokenizers.image.grid)).to(self.device)
        text = self.layout.text_ids(torch.as_tensor(text_ids, dtype=torch.long))
        if image.domain is not None and image.domain.out_of_domain:
            notes = (image.domain.message(), *notes)
        timings = {"preprocess_s": time.perf_counter() - start}
        order = self.decoding_orders[settings.order]
        steps = autoregressive_infer(
            self.decoder,
            order,
            prefix,
            samples=settings.samples,
            temperature=settings.temperature,
            top_k=settings.top_k,
            beam=settings.beam,
            generator=self._generator(settings.seed),
            image=image.prefill,
            reject_threshold=self.reject_threshold,
            decided=None if image.presence is None else self._base_decisions(image, order, [text])[0],
        )
        shown = 0  # the order's preview mark of the last partial mask drawn
        while not should_stop():
            with torch.inference_mode():
                step = next(steps, None)
            if step is None:
                return
            rejected = _rejected_fraction(step.rejected) > 0.5
            mark = order.preview_mark(step.codes, step.tokens_done)  # a new scale or a new raster row
            if not (step.finished or rejected or mark > shown):
                continue
            shown = mark
            update = self._stream_update(step, order, pixels, settings, image.domain, notes, timings, start)
            yield update
            if update.finished:
                return

    def _stream_update(
        self,
        step: DecodeStep,
        order: DecodingOrder,
        pixels: np.ndarray,
        settings: DecodingSettings,
        domain: DomainCheck | None,
        notes: tuple[str, ...],
        timings: dict[str, float],
        start: float,
    ) -> StreamUpdate:
        """A decoding step as the mask at the image's size, with its timings (updated in place), the notes
        for the status line and the domain check."""
        tick = time.perf_counter()
        rejected = _rejected_fraction(step.rejected) > 0.5
        probs = None if rejected else self._probabilities(step, order)
        lesion = None
        if step.finished and probs is not None and settings.snap:
            lesion = lesion_probability(step.lesion_logits, pixels.shape)
        timings["mask_decode_s"] = timings.get("mask_decode_s", 0.0) + time.perf_counter() - tick
        update = self._update(step, probs, pixels.shape, several=settings.samples > 1, lesion=lesion)
        elapsed = time.perf_counter() - start
        timings.setdefault("first_update_s", elapsed)
        timings["total_s"] = elapsed
        timings["tokens_per_s"] = step.tokens_done / max(elapsed - timings["preprocess_s"], 1e-9)
        update.timings = dict(timings)
        update.warnings = notes
        update.reject_probability = float(step.reject_probability)
        if domain is not None:
            update.domain_score, update.out_of_domain = domain.score, domain.out_of_domain
        return update

    def _segment_together(
        self, pixels: np.ndarray, prompts: list[str], settings: DecodingSettings, **options: Any
    ) -> list[SegmentationResult]:
        """Greedy masks of several findings decoded as one batch (`generate.infer_findings`); every result
        carries the time of the whole call. Stopped (`should_stop`): no result."""
        window, should_stop = options.get("window"), options.get("should_stop") or (lambda: False)
        start = time.perf_counter()
        encoded = [self._encode_prompt(prompt) for prompt in prompts]  # every prompt checked before any work
        image = self._image_part(pixels, window)
        order = self.decoding_orders[settings.order]
        texts = [self.layout.text_ids(torch.as_tensor(ids, dtype=torch.long)) for ids, _ in encoded]
        timings = {"preprocess_s": time.perf_counter() - start}
        decided = None if image.presence is None else self._base_decisions(image, order, texts)
        steps = infer_findings(
            self.decoder, order, image.prefill, texts, reject_threshold=self.reject_threshold, decided=decided
        )
        last = None
        while not should_stop():
            with torch.inference_mode():
                now = next(steps, None)
            if now is None:
                break
            last = now
        if last is None or not all(step.finished for step in last):
            return []
        results = []
        for prompt, (_, notes), step in zip(prompts, encoded, last, strict=True):
            notes = (
                (image.domain.message(), *notes) if image.domain is not None and image.domain.out_of_domain else notes
            )
            update = self._stream_update(step, order, pixels, settings, image.domain, notes, dict(timings), start)
            results.append(self._result(prompt, settings, update))
        return results

    # ------------------------------------------------------------------ helpers

    def check_prompt(self, prompt: str) -> PromptCheck | None:
        """The prompt's words against the model's training vocabulary (None: the model records none); raises
        PromptError when the prompt is empty, longer than the model reads, or has none of the known words."""
        self.tokenizers.text.encode(prompt)
        return self._vocabulary_check(prompt)

    def _vocabulary_check(self, prompt: str) -> PromptCheck | None:
        return self.vocabulary.check(prompt) if self.vocabulary is not None else None

    def domain(self, image: np.ndarray, window: tuple[float, float] | None = None) -> DomainCheck | None:
        """How far the 2D `image` is from the model's training images (None: the model has no guard); cheap to
        ask before `stream()`, which reuses the result for the same image."""
        if self.domain_guard is None:
            return None
        return self._domain_of(self._model_image(as_plane(image), window).to(self.device))

    def lesion_map(self, image: np.ndarray, window: tuple[float, float] | None = None) -> np.ndarray | None:
        """The stem's text-free lesion probability at the 2D `image`'s size, as the final snap reads it
        (None: the model has no lesion map). What a user's border cut is chosen on (finetune)."""
        stem = getattr(self.decoder, "pixel_stem", None)
        if stem is None or stem.lesion_map is None:
            return None
        plane = as_plane(image)
        with torch.no_grad():
            logits = self.decoder.lesion_logits(self._model_image(plane, window)[None].to(self.device))
        return lesion_probability(logits, plane.shape)

    def _domain_of(self, model_image: torch.Tensor) -> DomainCheck | None:
        """The check of a (1, S, S) model image, cached for the last image (a widget asks many prompts of one)."""
        if self.domain_guard is None or self.decoder.pixel_stem is None:
            return None
        key = hashlib.blake2b(model_image.detach().cpu().numpy().tobytes(), digest_size=16).digest()
        if self._domain_cache is None or self._domain_cache[0] != key:
            self._domain_cache = (key, self.domain_guard.check(self.decoder.pixel_stem, model_image[None]))
        return self._domain_cache[1]

    def _encode_prompt(self, prompt: str) -> tuple[list[int], tuple[str, ...]]:
        """Token ids of the prompt, plus the vocabulary check's note (unknown words) for the status line."""
        ids = list(self.tokenizers.text.encode(prompt))
        check = self._vocabulary_check(prompt)  # after encode: an empty prompt keeps its own message
        return ids, (check.note(),) if check is not None and check.note() else ()

    def _image_part(self, pixels: np.ndarray, window: tuple[float, float] | None) -> _ImagePart:
        """Everything about the slice that no prompt changes, computed once for all its findings: the
        (1, S, S) model image, its image codes, the domain check and the image block's prefill."""
        model_image, codes = self._model_input(pixels, window)
        block = image_block_ids(self.layout, codes, int(self.tokenizers.image.grid))
        with torch.inference_mode():
            prefill = prefill_image(self.decoder, block, model_image)
            presence = None
            if self.presence_decoder is not None:
                presence = prefill_image(self.presence_decoder, block, model_image)
        return _ImagePart(model_image, codes, self._domain_of(model_image), prefill, presence)

    def _base_decisions(self, image: _ImagePart, order: DecodingOrder, texts: list[torch.Tensor]) -> list[float]:
        """The adapter's base model's p([REJ]) for each finding (`texts`: vocabulary text ids)."""
        with torch.inference_mode():
            return presence_probabilities(self.presence_decoder, order, image.presence, texts)

    def _model_input(self, pixels: np.ndarray, window: tuple[float, float] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The (1, S, S) model image on the pipeline's device (the pixel stem's input) and its image codes."""
        with torch.inference_mode():
            batch = self._model_image(pixels, window)[None]
            codes = self.tokenizers.image.encode(batch)[0]
        return batch[0].to(self.device), codes

    def _model_image(self, pixels: np.ndarray, window: tuple[float, float] | None) -> torch.Tensor:
        """The (1, S, S) float32 model image on the CPU (windowed, scaled, resized): the one preprocessing
        that the pixel stem, the image tokenizer, the lesion map and the domain guard all read."""
        image = to_model_image(pixels, window, self.image_size)
        return torch.as_tensor(np.ascontiguousarray(image), dtype=torch.float32)[None]

    def _generator(self, seed: int | None) -> torch.Generator | None:
        if seed is None:
            return None
        return torch.Generator(device=self.device).manual_seed(int(seed))

    def _probabilities(self, step, order: DecodingOrder) -> np.ndarray:
        """Per-sample probabilities (B, S, S) of the codes so far; rejected samples count as empty masks."""
        tokenizer = self.tokenizers.masks[order.name]
        grids = order.preview_grids(step.codes)
        if not grids:
            return np.zeros((1, tokenizer.image_size, tokenizer.image_size), np.float32)
        with torch.inference_mode():
            probs = tokenizer.decode([g.cpu() for g in grids])[:, 0].float().numpy()
        rejected = np.broadcast_to(np.asarray(_as_bool_array(step.rejected)), (probs.shape[0],))
        probs[rejected] = 0.0
        return probs

    def _update(
        self, step, probs: np.ndarray | None, shape: tuple[int, int], *, several: bool, lesion: np.ndarray | None = None
    ) -> StreamUpdate:
        """Consensus over samples: mean probability thresholded at 0.5; std as the uncertainty; snapped to
        the `lesion` probability map when one is given (lesion_snap.py)."""
        progress = step.tokens_done / step.tokens_total if step.tokens_total else 1.0
        if probs is None:
            return StreamUpdate(
                mask=np.zeros(shape, bool),
                probability=None,
                uncertainty=None,
                progress=1.0,
                tokens_done=int(step.tokens_done),
                tokens_total=int(step.tokens_total),
                rejected=True,
                finished=True,
            )
        probability = resize_probability(probs.mean(axis=0), shape).astype(np.float32)
        if lesion is not None:
            probability = snap_to_lesion_map(probability, lesion, self.lesion_threshold)
        uncertainty = resize_probability(probs.std(axis=0), shape).astype(np.float32) if several else None
        return StreamUpdate(
            mask=probability >= 0.5,
            probability=probability,
            uncertainty=uncertainty,
            progress=float(min(max(progress, 0.0), 1.0)) if not step.finished else 1.0,
            tokens_done=int(step.tokens_done),
            tokens_total=int(step.tokens_total),
            rejected=False,
            finished=bool(step.finished),
        )


@dataclass
class _ImagePart:
    """The prompt-independent part of a stream, shared by every finding of one image."""

    model_image: torch.Tensor  # (1, S, S) on the pipeline's device, the pixel stem's input
    codes: torch.Tensor  # the image tokenizer's codes (g*g)
    domain: DomainCheck | None
    prefill: ImagePrefill
    presence: ImagePrefill | None = None  # the base model's prefill, when an adapter is loaded (presence_decoder)


def lesion_probability(lesion_logits: torch.Tensor | None, shape: tuple[int, int]) -> np.ndarray | None:
    """A U-Net stem's (1, 1, h, w) lesion-map logits as a probability at the image's `shape`; None for a
    decoder without a map (no stem, or a linear per-patch read-out of shape (1, g*g))."""
    if lesion_logits is None or lesion_logits.dim() != 4:
        return None
    return resize_probability(torch.sigmoid(lesion_logits.float())[0, 0].cpu().numpy(), shape)


def _as_bool_array(rejected) -> np.ndarray:
    if isinstance(rejected, torch.Tensor):
        return rejected.detach().cpu().numpy().astype(bool)
    return np.asarray(bool(rejected))


def _rejected_fraction(rejected) -> float:
    return float(np.mean(_as_bool_array(rejected)))
