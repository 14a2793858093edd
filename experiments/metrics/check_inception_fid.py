#!/usr/bin/env python
"""FID between Fashion-MNIST train and test through this package's Inception path and through torch-fidelity.

    python experiments/metrics/check_inception_fid.py [--num-images 1000] [--weights PATH] [--batch-size 50]
        [--json OUT]

Both sides score the same uint8 images: the first ``--num-images`` of each split, padded to 32x32 and quantised with
``diffusion_lightning.metrics.to_uint8`` (grayscale repeated to 3 channels, as the ``inception`` extractor does).
Ours: ``get_extractor("inception")`` -> ``feature_statistics`` -> ``frechet_distance``. torch-fidelity:
``calculate_metrics(fid=True)`` on Datasets of those uint8 tensors, its ``FeatureExtractorInceptionV3`` loading the
converted weights of ``make inception-weights`` (torch-fidelity insists on an ``fc`` layer, which the converted
file lacks: a zero one is added in a temporary copy; pool3 features and hence FID do not use it).
Inception costs about 0.2 s per image on 2 CPU cores, and every image is scored twice.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from diffusion_lightning.data import FashionMNISTDataModule
from diffusion_lightning.metrics import extract_features, feature_statistics, frechet_distance, get_extractor, to_uint8
from diffusion_lightning.metrics.inception_weights import default_converted_path


class Uint8Images(Dataset):
    """uint8 (N, 1 or 3, H, W) -> items (3, H, W) uint8, the input torch-fidelity's Inception takes."""

    def __init__(self, images: Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Tensor:
        return self.images[i].expand(3, -1, -1).contiguous()


def first_images(datamodule: FashionMNISTDataModule, split: str, n: int) -> Tensor:
    """The first ``n`` images of a split (32x32, background-padded) as uint8 via ``to_uint8``."""
    data = datamodule.dataset(split)
    return to_uint8(torch.stack([data[i][0] for i in range(min(n, len(data)))]))


def weights_with_fc(path: Path, tmp: Path) -> Path:
    """A copy of the converted state dict with a zero 1008-way ``fc`` (torch-fidelity loads strictly)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    state.setdefault("fc.weight", torch.zeros(1008, 2048))
    state.setdefault("fc.bias", torch.zeros(1008))
    out = tmp / "inception-with-zero-fc.pth"
    torch.save(state, out)
    return out


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=1000, help="first N images of each split")
    parser.add_argument("--weights", type=Path, default=None, help="converted Inception weights (default: make's)")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--root", default="data", help="data root (Debian's /usr/share/datasets is found first)")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args(argv)
    weights = args.weights or default_converted_path()
    if not weights.is_file():
        parser.exit(2, f"error: {weights} not found; run `make inception-weights` first\n")

    dm = FashionMNISTDataModule(root=args.root, image_size=32, resize="pad", download=False)
    dm.prepare_data()
    train, test = (first_images(dm, split, args.num_images) for split in ("train", "test"))

    start = time.perf_counter()
    extractor = get_extractor("inception", weights_path=weights)
    stats = []
    for images in (train, test):
        batches = (images[i : i + args.batch_size] for i in range(0, len(images), args.batch_size))
        stats.append(feature_statistics(extract_features(extractor, batches, progress=True)["features"]))
    ours = frechet_distance(*stats[0], *stats[1])
    ours_s = time.perf_counter() - start
    print(f"ours:          FID {ours:.6f} ({ours_s:.0f} s)", flush=True)

    import torch_fidelity

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        fidelity = torch_fidelity.calculate_metrics(
            input1=Uint8Images(train), input2=Uint8Images(test), fid=True, cuda=torch.cuda.is_available(),
            batch_size=args.batch_size, feature_extractor_weights_path=str(weights_with_fc(weights, Path(tmp))),
            cache=False, save_cpu_ram=True, verbose=True,
        )["frechet_inception_distance"]  # fmt: skip
    fidelity_s = time.perf_counter() - start
    rel = abs(ours - fidelity) / abs(fidelity)
    print(f"torch-fidelity: FID {fidelity:.6f} ({fidelity_s:.0f} s)")
    print(f"relative difference: {rel:.3e}  ({len(train)} train vs {len(test)} test images, 32x32 padded)")
    result = {"num_images": len(train), "fid_ours": ours, "fid_torch_fidelity": fidelity, "relative_difference": rel,
              "seconds_ours": round(ours_s, 1), "seconds_torch_fidelity": round(fidelity_s, 1),
              "weights": str(weights)}  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
