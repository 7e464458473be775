"""Domain guard: how far a slice is from the images the model was trained on (`domain.safetensors`).

The model draws a mask on anything it is given: a CT slice asked for "liver", a natural photograph, random
noise. The guard scores the slice before decoding: the pixel stem's encoder stages (the decoder's CNN, which
reads every slice anyway) are pooled to one vector per stage (channel means and standard deviations), and
the score is the Mahalanobis distance of that vector to its mean and covariance over the training split.
A score above the threshold, calibrated on the validation split so that at most 1 % of it is flagged,
marks the slice out of domain. `napari-mris-train domain` writes the file; docs/results.md ("Domain
guard") gives the measured false alarms and detections, and why this score rather than the image
tokenizer's reconstruction error. A model directory without the file has no guard (score None).

The statistics depend only on the stem's encoder weights, so they stay valid for a model whose token
decoder is retrained with the stem frozen; `DomainGuard.load` refuses a file whose feature size does not
fit the decoder's stem.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from napari_mris.errors import ModelDirectoryError
from napari_mris.model.modeldir import save_weights

DOMAIN_FILE = "domain.safetensors"
FORMAT_VERSION = "1"
FEATURES = "stem-encoder-pooled-mean-std"  # the only feature kind so far; recorded so a new one can be told apart


@dataclass(frozen=True)
class DomainCheck:
    """A slice's domain score against the model's threshold."""

    score: float
    threshold: float

    @property
    def out_of_domain(self) -> bool:
        return self.score > self.threshold

    def message(self) -> str:
        """One line for the status line and the CLI."""
        return (
            f"out of domain: the image looks unlike the chest X-rays the model was trained on "
            f"(domain score {self.score:.1f} > {self.threshold:.1f}); its mask would be meaningless"
        )


def stem_features(stem: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(B, 1, S, S) model images in [0, 1] -> (B, D) features: per encoder stage of the pixel stem, the channel
    means then the channel standard deviations over the image (D = 2 x the sum of the stage widths)."""
    x = images.to(next(stem.parameters()).dtype) * 2.0 - 1.0  # the stem's own input scaling (PixelStem.forward)
    pooled = []
    for stage in stem.stages:
        x = stage(x)
        flat = x.flatten(2)
        pooled += [flat.mean(2), flat.std(2)]
    return torch.cat(pooled, 1).float()


def stem_digest(stem: torch.nn.Module) -> str:
    """sha256 of the stem's encoder weights (the only weights the features depend on), in key order, rounded
    to float16: a half-precision export (`napari-mris-train export --float16`) of the same stem keeps its
    statistics (measured on Val_Folder: 14 of 1,429 flagged either way, scores moved by at most 0.02)."""
    digest = hashlib.sha256()
    for key, tensor in sorted(stem.stages.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().to(torch.float16).contiguous().numpy().tobytes())
    return digest.hexdigest()


class DomainGuard:
    """Mean and whitening matrix of the training features plus the calibrated threshold."""

    def __init__(self, mean: torch.Tensor, whitening: torch.Tensor, threshold: float, info: dict[str, Any]) -> None:
        if mean.ndim != 1 or whitening.shape != (mean.shape[0], mean.shape[0]):
            raise ValueError(f"mean {tuple(mean.shape)} and whitening {tuple(whitening.shape)} do not fit")
        # float32 values (as the file stores them) computed in float64: a fitted guard scores as its saved copy
        self.mean = mean.float().double()
        # W, upper triangular, with W^T W = inverse covariance: |W (f - mean)| is the Mahalanobis distance
        self.whitening = torch.triu(whitening.float().double())
        self.threshold = float(threshold)
        self.info = info  # how it was calibrated (datasets, counts, false-alarm rate), for docs and `info`

    @property
    def n_features(self) -> int:
        return int(self.mean.shape[0])

    @classmethod
    def fit(cls, features: torch.Tensor, shrinkage: float, info: dict[str, Any] | None = None) -> DomainGuard:
        """Gaussian fit of (N, D) training features; the covariance is shrunk towards its mean variance by
        `shrinkage` (a fraction) so that it stays invertible and the score does not hinge on tiny eigenvalues."""
        data = features.double()
        mean = data.mean(0)
        centred = data - mean
        cov = centred.T @ centred / max(len(data) - 1, 1)
        cov = (1 - shrinkage) * cov + shrinkage * torch.eye(len(cov), dtype=cov.dtype) * cov.diagonal().mean()
        whitening = torch.linalg.cholesky(torch.linalg.inv(cov)).T  # L L^T = P  ->  |L^T x|^2 = x^T P x
        return cls(mean, whitening, float("inf"), dict(info or {}, shrinkage=shrinkage))

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        """(N, D) features -> (N,) Mahalanobis distances."""
        if features.ndim != 2 or features.shape[1] != self.n_features:
            raise ValueError(f"expected (N, {self.n_features}) features, got {tuple(features.shape)}")
        return ((features.double() - self.mean) @ self.whitening.T).norm(dim=1)

    def check(self, stem: torch.nn.Module, image: torch.Tensor) -> DomainCheck:
        """The domain check of one (1, 1, S, S) model image."""
        with torch.inference_mode():
            score = float(self.scores(stem_features(stem, image.float()).cpu())[0])
        return DomainCheck(score, self.threshold)

    # ------------------------------------------------------------------ file

    def save(self, model_dir: str | Path) -> Path:
        path = Path(model_dir) / DOMAIN_FILE
        metadata = {
            "format_version": FORMAT_VERSION,
            "features": FEATURES,
            "threshold": repr(self.threshold),
            "info": json.dumps(self.info, sort_keys=True),
        }
        rows, cols = torch.triu_indices(self.n_features, self.n_features)
        # the triangle only: half the bytes (832 features: 1.4 MB instead of 2.8 MB), the same numbers
        tensors = {"mean": self.mean.float(), "whitening_upper": self.whitening[rows, cols].float()}
        save_weights(path, tensors, metadata=metadata)
        return path

    @classmethod
    def load(cls, model_dir: str | Path, stem: torch.nn.Module | None) -> DomainGuard | None:
        """The model directory's guard, or None when it has no `domain.safetensors`; a file that is unreadable
        or does not fit the decoder's stem is a ModelDirectoryError naming it."""
        path = Path(model_dir) / DOMAIN_FILE
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = dict(handle.metadata() or {})
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 - not a dict
            if metadata.get("format_version") != FORMAT_VERSION or metadata.get("features") != FEATURES:
                raise ValueError(
                    f"format {metadata.get('format_version')!r} / features {metadata.get('features')!r}; this "
                    f"napari-mris reads format {FORMAT_VERSION} / {FEATURES}"
                )
            info = json.loads(metadata["info"])
            guard = cls(tensors["mean"], _unpack_upper(tensors["whitening_upper"]), float(metadata["threshold"]), info)
        except (SafetensorError, OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelDirectoryError(f"{path} is not a readable domain guard: {exc}") from exc
        if stem is None:
            raise ModelDirectoryError(f"{path} scores pixel-stem features, but this model's decoder has no pixel stem")
        expected = 2 * sum(int(stage[0].out_channels) for stage in stem.stages)
        if guard.n_features != expected:
            raise ModelDirectoryError(
                f"{path} holds statistics of {guard.n_features} features, but this decoder's pixel stem gives "
                f"{expected}: it was calibrated for another model (re-run napari-mris-train domain)"
            )
        recorded = guard.info.get("stem_sha256")
        if recorded is not None and recorded != stem_digest(stem):
            raise ModelDirectoryError(
                f"{path} was calibrated on another pixel stem (weights digest {str(recorded)[:12]}, this decoder's "
                f"{stem_digest(stem)[:12]}): re-run napari-mris-train domain for this model"
            )
        return guard


def _unpack_upper(packed: torch.Tensor) -> torch.Tensor:
    """The (D, D) upper-triangular matrix whose row-major upper triangle is `packed` (D (D + 1) / 2 values)."""
    size = (math.isqrt(8 * packed.numel() + 1) - 1) // 2
    if packed.ndim != 1 or size * (size + 1) // 2 != packed.numel():
        raise ValueError(f"{packed.numel()} values do not fill the upper triangle of a square matrix")
    matrix = torch.zeros(size, size, dtype=packed.dtype)
    rows, cols = torch.triu_indices(size, size)
    matrix[rows, cols] = packed
    return matrix
