"""LPIPS perceptual distance (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual
Metric", Eq. 1) with the VGG-16 backbone, the perceptual loss of the latent-diffusion autoencoder.

Both weight files are read from local paths; nothing is ever downloaded.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

# torchvision's VGG-16 "D" configuration: conv widths, "M" = 2x2 max-pool.
_VGG16_CFG: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
# Indices into ``features`` of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (the LPIPS taps).
_TAPS = (3, 8, 15, 22, 29)
_TAP_CHANNELS = (64, 128, 256, 512, 512)

_BACKBONE_HELP = (
    "torchvision's VGG-16 ImageNet weights, 'vgg16-397923af.pth' (torchvision.models.VGG16_Weights.IMAGENET1K_V1, "
    "saved by torchvision into ~/.cache/torch/hub/checkpoints/ on a machine with internet)"
)
_LIN_HELP = "the LPIPS linear heads 'vgg.pth', shipped in the 'lpips' PyPI package under lpips/weights/v0.1/"


def _vgg16_features() -> nn.Sequential:
    """torchvision's ``vgg16().features`` up to relu5_3 (same module indices, so the same state-dict keys), built
    without the 120M-parameter classifier and with non-inplace ReLUs."""
    layers: list[nn.Module] = []
    width = 3
    for item in _VGG16_CFG:
        if item == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(width, int(item), 3, padding=1), nn.ReLU()]
            width = int(item)
    return nn.Sequential(*layers)


def _load(path: str | Path, what: str) -> Mapping[str, Tensor]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"LPIPS weight file not found: {path}. It should hold {what}; copy it there by hand (nothing is "
            "downloaded). The perceptual loss is optional: disable it to train the autoencoder without these files."
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} does not hold a state dict (got {type(state).__name__})")
    return state


def _normalize(x: Tensor, eps: float = 1e-10) -> Tensor:
    """Unit-normalise the features over channels (LPIPS Eq. 1's hat{y})."""
    return x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


class LPIPS(nn.Module):
    """d(x, y) = sum_l mean_hw || w_l * (hat{y}_l(x) - hat{y}_l(y)) ||^2 over the VGG-16 relu{1_2, 2_2, 3_3, 4_3,
    5_3} features (LPIPS v0.1, Eq. 1).

    ``backbone_weights``: torchvision's VGG-16 state dict (keys ``features.N.weight``, or just ``N.weight``);
    ``lin_weights``: the lpips package's ``weights/v0.1/vgg.pth`` (keys ``lin{0..4}.model.1.weight``). Inputs are
    images in [-1, 1] of shape (B, 3 or 1, H, W) (grayscale is repeated to RGB); the output is (B,). All parameters
    are frozen and the module stays in eval mode, but gradients flow to the inputs (for use as a loss).
    """

    def __init__(self, backbone_weights: str | Path, lin_weights: str | Path) -> None:
        super().__init__()
        backbone = _load(backbone_weights, _BACKBONE_HELP)
        lins = _load(lin_weights, _LIN_HELP)

        self.features = _vgg16_features()
        if any(k.startswith("features.") for k in backbone):
            backbone = {k.removeprefix("features."): v for k, v in backbone.items() if k.startswith("features.")}
        self.features.load_state_dict(backbone)

        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in _TAP_CHANNELS)
        for i, (lin, c) in enumerate(zip(self.lins, _TAP_CHANNELS, strict=True)):
            key = f"lin{i}.model.1.weight"
            if key not in lins:
                raise KeyError(f"{lin_weights} has no '{key}': expected {_LIN_HELP}")
            if tuple(lins[key].shape) != (1, c, 1, 1):
                raise ValueError(f"{lin_weights}: '{key}' has shape {tuple(lins[key].shape)}, expected (1, {c}, 1, 1)")
            lin.weight.data.copy_(lins[key])

        # ScalingLayer: maps [-1, 1] inputs to (roughly) the ImageNet-normalised range VGG was trained on.
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LPIPS:
        """Always eval mode: the metric is fixed, whatever mode the enclosing model is put in."""
        return super().train(False)

    def _taps(self, x: Tensor) -> list[Tensor]:
        taps = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in _TAPS:
                taps.append(x)
        return taps

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """LPIPS distance between two image batches in [-1, 1]: (B,)."""
        if x.shape != y.shape or x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"expected two (B, 1 or 3, H, W) batches of the same shape, got {tuple(x.shape)} and "
                             f"{tuple(y.shape)}")  # fmt: skip
        if x.shape[1] == 1:
            x, y = x.repeat(1, 3, 1, 1), y.repeat(1, 3, 1, 1)
        both = (torch.cat([x, y]) - self.shift) / self.scale  # one VGG pass for both batches
        distance = x.new_zeros(x.shape[0])
        for feats, lin in zip(self._taps(both), self.lins, strict=True):
            fx, fy = _normalize(feats).chunk(2)
            distance = distance + lin((fx - fy).pow(2)).mean(dim=(1, 2, 3))
        return distance
