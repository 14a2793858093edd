"""The diffusers side of the benchmark: same layout as our UNet, and its training recipe runs."""

from __future__ import annotations

import math
import warnings
from typing import Any

import pytest
from torch import nn

pytest.importorskip("diffusers")

from diffusion_lightning.bench.diffusers import diffusers_train_throughput  # noqa: E402
from diffusion_lightning.bench.recipes import net_config  # noqa: E402
from diffusion_lightning.interop.diffusers import diffusers_unet  # noqa: E402
from diffusion_lightning.nets import UNet  # noqa: E402

TINY = dict(image_size=8, in_channels=1, model_channels=16, channel_mult=[1, 2], num_res_blocks=1,
            attention_resolutions=[4], num_groups=4)
SMALL = dict(image_size=16, in_channels=3, model_channels=32, channel_mult=[1, 2, 2], num_res_blocks=1,
             attention_resolutions=[8, 4], dropout=0.1, num_groups=8)


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def ours(net: dict[str, Any]) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return count(UNet(**net))


@pytest.mark.parametrize(("experiment", "expected"), [("ddpm_fmnist", 1_062_497), ("ddpm_cifar", 35_746_307)],
                         ids=["fmnist-default", "ddpm-cifar10"])
def test_parameter_counts_match_exactly(experiment: str, expected: int) -> None:
    # The layouts (from conf/) agree block for block, so the counts are equal (not merely within 0.5%).
    net = net_config(experiment)
    assert ours(net) == expected
    assert count(diffusers_unet(net)) == expected


@pytest.mark.parametrize("extra", [
    dict(out_channels=6, use_scale_shift_norm=True, num_heads=4),  # IDDPM options (attention widths all 64)
    dict(resblock_updown=True, num_head_channels=16, channel_mult=[1, 2, 3]),
    dict(num_classes=10),
], ids=["iddpm", "resblock-updown", "classes"])
def test_adm_options_map(extra: dict[str, Any]) -> None:
    net = {**SMALL, **extra}
    model = diffusers_unet(net)
    assert count(model) == ours(net)
    heads = {m.heads for m in model.modules() if type(m).__name__ == "Attention"}
    assert heads == ({4} if "num_heads" in extra else {4, 6} if "num_head_channels" in extra else {1})


def test_train_throughput_tiny() -> None:
    stats: dict[str, float] = {}
    rate = diffusers_train_throughput(TINY, batch=4, steps=2, warmup=1, stats=stats)
    assert rate > 0 and math.isfinite(rate)
    assert math.isfinite(stats["loss"]) and stats["seconds"] > 0
    assert stats["params"] == ours(TINY)


@pytest.mark.parametrize(("extra", "option"), [
    (dict(num_heads=2, attention_resolutions=[4, 8]), "num_heads"),  # 2 heads at widths 16 and 32: no single head dim
    (dict(use_checkpoint=True), "use_checkpoint"),
])
def test_unmappable_option_raises(extra: dict[str, Any], option: str) -> None:
    with pytest.raises(ValueError, match=option):
        diffusers_unet({**TINY, **extra})
