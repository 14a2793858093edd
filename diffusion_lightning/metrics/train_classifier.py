"""Train the ``fmnist-classifier`` feature network on Fashion-MNIST with plain PyTorch.

    python -m diffusion_lightning.metrics.train_classifier --out PATH --epochs N

Data comes from :class:`~diffusion_lightning.data.FashionMNISTDataModule` (28x28 padded with the background to
32x32, uint8 x -> x / 127.5 - 1). Seeds are fixed; the script reports the test accuracy, refuses to write weights
below ``--min-accuracy`` (90%), and writes the state dict (tensors only, loadable with ``weights_only=True``) plus
``<out>.json`` with accuracy, epochs, time and date.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from diffusion_lightning.images import from_uint8
from diffusion_lightning.nets.classifier import FashionMNISTClassifier

from .features import DEFAULT_FMNIST_WEIGHTS


def load_fashion_mnist(root: str = "data") -> dict[str, tuple[Tensor, Tensor]]:
    """{split: (uint8 images (N, 1, 32, 32), int64 labels (N,))} for the train and test splits."""
    from diffusion_lightning.data import FashionMNISTDataModule

    dm = FashionMNISTDataModule(root=root, image_size=32, resize="pad", num_workers=0, download=False)
    dm.prepare_data()
    dm.setup("fit")
    out = {}
    for split in ("train", "test"):
        ds = dm.dataset(split)
        out[split] = (ds.images, ds.labels)
    return out


def augment(x: Tensor, generator: torch.Generator) -> Tensor:
    """Random horizontal flips (Fashion-MNIST items are left-right symmetric up to details)."""
    flip = torch.rand(x.shape[0], generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


@torch.no_grad()
def evaluate(model: FashionMNISTClassifier, images: Tensor, labels: Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy."""
    model.eval()
    correct = 0
    for i in range(0, len(images), batch_size):
        logits = model(from_uint8(images[i : i + batch_size]))
        correct += int((logits.argmax(1) == labels[i : i + batch_size]).sum())
    return correct / len(images)


def train(
    epochs: int = 5, batch_size: int = 128, lr: float = 2e-3, seed: int = 0, root: str = "data", log: bool = True
) -> tuple[FashionMNISTClassifier, dict[str, float]]:
    """Adam with a one-cycle learning rate, label smoothing 0.05; returns the model (eval mode) and a summary."""
    torch.manual_seed(seed)
    data = load_fashion_mnist(root)
    (x_train, y_train), (x_test, y_test) = data["train"], data["test"]
    model = FashionMNISTClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps_per_epoch = len(x_train) // batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    g = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(x_train), generator=g)
        total = 0.0
        for b in range(steps_per_epoch):
            idx = perm[b * batch_size : (b + 1) * batch_size]
            x = augment(from_uint8(x_train[idx]), g)
            loss = F.cross_entropy(model(x), y_train[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        acc = evaluate(model, x_test, y_test)
        if log:
            print(f"epoch {epoch + 1}/{epochs}: loss {total / steps_per_epoch:.4f}, test accuracy {acc:.4f}, "
                  f"{time.perf_counter() - start:.0f}s", flush=True)  # fmt: skip
    seconds = time.perf_counter() - start
    model.eval()
    return model, {"test_accuracy": evaluate(model, x_test, y_test), "train_seconds": seconds}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_FMNIST_WEIGHTS, help="weights file (.pt)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--root", default="data", help="data root for FashionMNISTDataModule")
    parser.add_argument("--min-accuracy", type=float, default=0.90)
    args = parser.parse_args(argv)

    model, summary = train(args.epochs, args.batch_size, args.lr, args.seed, args.root)
    acc = summary["test_accuracy"]
    print(f"test accuracy {acc:.4f} after {args.epochs} epochs in {summary['train_seconds']:.0f}s "
          f"({torch.get_num_threads()} threads)")  # fmt: skip
    if acc < args.min_accuracy:
        raise SystemExit(f"test accuracy {acc:.4f} < {args.min_accuracy}: weights not written")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, args.out)
    meta = {
        "network": "diffusion_lightning.nets.classifier.FashionMNISTClassifier",
        "dataset": "Fashion-MNIST, 28x28 padded to 32x32, x / 127.5 - 1",
        "test_accuracy": round(acc, 4),
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
        "train_seconds": round(summary["train_seconds"], 1),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    args.out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
