"""A small CNN classifier for 1x32x32 Fashion-MNIST, the feature network of the ``fmnist-classifier`` metrics.

Its 128-d penultimate activations play the role of Inception's pool3 features (FID/KID) and its softmax the role of
Inception's class posterior (IS), the usual substitute for Inception on (Fashion-)MNIST.
"""

from __future__ import annotations

from torch import Tensor, nn


def _block(c_in: int, c_out: int) -> nn.Sequential:
    """conv3x3 - BatchNorm - ReLU - 2x2 max-pool (halves the resolution)."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class FashionMNISTClassifier(nn.Module):
    """Three conv blocks (32, 64, 128 channels: 32 -> 16 -> 8 -> 4 pixels), a 2048 -> 128 linear layer (the
    features) and a ReLU + dropout + 128 -> 10 head. Takes float images in [-1, 1] of shape (B, 1, 32, 32); 0.36M
    parameters (1.4 MB in float32)."""

    feature_dim = 128
    num_classes = 10
    image_size = 32

    def __init__(self, channels: tuple[int, int, int] = (32, 64, 128), dropout: float = 0.3) -> None:
        super().__init__()
        c1, c2, c3 = channels
        self.body = nn.Sequential(_block(1, c1), _block(c1, c2), _block(c2, c3), nn.Flatten())
        self.embed = nn.Linear(c3 * 4 * 4, self.feature_dim)
        self.head = nn.Sequential(nn.ReLU(), nn.Dropout(dropout), nn.Linear(self.feature_dim, self.num_classes))

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(features (B, 128), logits (B, 10)). The features are the penultimate layer *before* its ReLU: every
        unit varies (post-ReLU, units that are never active would give constant, useless coordinates)."""
        if x.ndim != 4 or x.shape[1:] != (1, self.image_size, self.image_size):
            raise ValueError(f"expected (B, 1, 32, 32) images, got {tuple(x.shape)}")
        features = self.embed(self.body(x))
        return features, self.head(features)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_features(x)[1]

