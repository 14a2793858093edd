"""diffusers interop in one place: our U-Net's layout as diffusers' ``UNet2DModel`` (:func:`diffusers_unet`), our
weights under its names (:func:`diffusers_state_dict`, :func:`to_diffusers_unet`) and our discrete schedule as its
``DDPMScheduler`` (:func:`diffusers_scheduler`). The export entry (:mod:`diffusion_lightning.export`) and the
benchmark's diffusers side (:mod:`diffusion_lightning.bench_diffusers`) both use it.

Parameter counts are identical, not just close: the default Fashion-MNIST model (1,062,497 at 32x32 in 1 channel,
ch 32, mult 1-2-2, 1 block) and the DDPM CIFAR-10 layout (35,746,307, the 35.7M of Ho et al. and of diffusers'
``google/ddpm-cifar10-32``). The layouts match block for block (a ResBlock is diffusers' ``ResnetBlock2D``, the
attention block one ``Attention`` with GroupNorm, biased q/k/v/out projections). Numerical differences that change
neither the count nor the cost: the Downsample conv pads (1, 1) as ours (``downsample_padding=1``; the converted DDPM
checkpoint uses 0, TF's asymmetric "SAME") and GroupNorm's eps is PyTorch's 1e-5 as ours (the converted checkpoint:
1e-6).

diffusers is a dev dependency, imported only inside the functions here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from ..errors import UserError

if TYPE_CHECKING:
    from diffusers import DDPMScheduler, UNet2DModel

    from ..nets import UNet

_INSTALL_HINT = "pip install diffusers (or make install, which installs the dev extras)"

# Keys of diffusion_lightning.nets.UNet (plus Hydra's _target_) that diffusers_unet understands.
_KNOWN_KEYS = {
    "_target_", "image_size", "in_channels", "out_channels", "model_channels", "channel_mult", "num_res_blocks",
    "attention_resolutions", "dropout", "num_heads", "num_head_channels", "num_classes", "use_scale_shift_norm",
    "resblock_updown", "num_groups",
}

#: Our prediction types as diffusers names them.
PREDICTION_TYPES = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}


def import_diffusers() -> Any:
    try:
        import diffusers
    except ImportError as e:
        raise ImportError(f"this needs diffusers: {_INSTALL_HINT}") from e
    return diffusers


def _attention_head_dim(widths: set[int], num_heads: int, num_head_channels: int) -> int | None:
    """diffusers' single ``attention_head_dim`` (heads = width // head_dim) giving our head count at every width."""
    if num_head_channels > 0:
        if bad := sorted(w for w in widths if w % num_head_channels):
            raise ValueError(f"num_head_channels={num_head_channels} does not divide the attention widths {bad}")
        return num_head_channels
    if num_heads == 1:
        return None  # diffusers then uses each block's width as the head dim: one head everywhere
    if len(widths) != 1 or next(iter(widths)) % num_heads:
        raise ValueError(
            f"num_heads={num_heads} cannot be mapped to diffusers: its attention_head_dim fixes channels per head, so "
            f"a constant head count needs one attention width, but attention (incl. the middle block) runs at widths "
            f"{sorted(widths)}; use num_head_channels instead"
        )
    return next(iter(widths)) // num_heads


def diffusers_unet(net: Mapping[str, Any]) -> UNet2DModel:
    """diffusers' ``UNet2DModel`` with the layout of ``diffusion_lightning.nets.UNet(**net)``.

    ``net`` holds UNet's keyword arguments (a Hydra ``model.net`` node works; ``_target_`` is ignored). Options that
    diffusers cannot express raise ValueError naming them.
    """
    diffusers = import_diffusers()
    if unknown := sorted(set(net) - _KNOWN_KEYS):
        raise ValueError(f"UNet option(s) {unknown} cannot be mapped to diffusers' UNet2DModel")
    image_size = int(net.get("image_size", 32))
    in_channels = int(net.get("in_channels", 3))
    out_channels = int(net.get("out_channels") or in_channels)
    ch = int(net.get("model_channels", 128))
    channel_mult = [int(m) for m in net.get("channel_mult", (1, 2, 2, 2))]
    attention_resolutions = {int(r) for r in net.get("attention_resolutions", (16,))}
    scale_shift = bool(net.get("use_scale_shift_norm", False))
    updown = bool(net.get("resblock_updown", False))
    levels = len(channel_mult)
    if levels == 0 or image_size % 2 ** (levels - 1):
        raise ValueError(f"image_size={image_size} is not divisible by 2**(len(channel_mult)-1)={2 ** (levels - 1)}")
    resolutions = [image_size // 2**i for i in range(levels)]
    if bad := sorted(attention_resolutions - set(resolutions)):
        raise ValueError(f"attention_resolutions {bad} do not occur in this U-Net (levels at {resolutions})")
    attn = [r in attention_resolutions for r in resolutions]
    widths = [ch * m for m in channel_mult]
    head_dim = _attention_head_dim(
        {w for w, a in zip(widths, attn, strict=True) if a} | {widths[-1]},
        int(net.get("num_heads", 1)), int(net.get("num_head_channels", -1)),
    )
    num_groups = int(net.get("num_groups", 32))
    # Plain blocks resample with a stride-2 conv / nearest+conv ("conv"); ADM's resblock_updown resamples inside a
    # ResBlock with avg-pool / nearest ("resnet"; for plain levels diffusers names these Resnet*sampleBlock2D).
    down_plain, up_plain = ("ResnetDownsampleBlock2D", "ResnetUpsampleBlock2D") if updown else ("DownBlock2D",
                                                                                                 "UpBlock2D")
    return diffusers.UNet2DModel(
        sample_size=image_size,
        in_channels=in_channels,
        out_channels=out_channels,
        block_out_channels=tuple(widths),
        layers_per_block=int(net.get("num_res_blocks", 2)),
        down_block_types=tuple("AttnDownBlock2D" if a else down_plain for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else up_plain for a in reversed(attn)),
        downsample_type="resnet" if updown else "conv",
        upsample_type="resnet" if updown else "conv",
        downsample_padding=1,  # our Downsample: Conv2d(3, stride=2, padding=1)
        dropout=float(net.get("dropout", 0.1)),
        act_fn="silu",
        attention_head_dim=head_dim,
        norm_num_groups=num_groups,
        attn_norm_num_groups=num_groups,  # else the middle attention loses its GroupNorm with scale_shift
        norm_eps=1e-5,
        # Our timestep_embedding is [sin, cos] with frequencies exp(-log(1e4) * i / (half - 1)), as in DDPM and
        # diffusers' conversion of it (google/ddpm-cifar10-32: flip_sin_to_cos=False, freq_shift=1).
        time_embedding_type="positional",
        flip_sin_to_cos=False,
        freq_shift=1,
        resnet_time_scale_shift="scale_shift" if scale_shift else "default",
        add_attention=True,
        # nn.Embedding added to the time embedding, as ours (whose last row is the guidance null class)
        num_class_embeds=None if net.get("num_classes") is None else net["num_classes"] + 1,
    )


def build_diffusers_unet(net_config: Mapping[str, Any]) -> UNet2DModel:
    """diffusers' ``UNet2DModel`` laid out as ``UNet(**net_config)``; options it cannot express raise UserError."""
    mult = list(net_config.get("channel_mult", (1, 2, 2, 2)))
    if mult and int(mult[0]) != 1:
        raise UserError(
            f"cannot export model.net.channel_mult={mult}: diffusers' UNet2DModel makes its input conv "
            "block_out_channels[0] wide and its time embedding 4x that, ours model_channels and 4 * model_channels, "
            "so they agree only for channel_mult[0] = 1"
        )
    try:
        return diffusers_unet(net_config)
    except ValueError as e:
        raise UserError(f"cannot export this U-Net to diffusers: {e}") from None


class _StateMapper:
    """Moves our state-dict tensors onto diffusers' names, each of ours used exactly once."""

    def __init__(self, ours: Mapping[str, Tensor]) -> None:
        self.ours = {k: v.detach() for k, v in ours.items()}
        self.used: set[str] = set()
        self.out: dict[str, Tensor] = {}

    def take(self, key: str) -> Tensor:
        if key in self.used:
            raise AssertionError(f"our tensor {key} mapped twice")
        if key not in self.ours:
            raise AssertionError(f"our state dict has no {key}")
        self.used.add(key)
        return self.ours[key]

    def put(self, key: str, value: Tensor) -> None:
        if key in self.out:
            raise AssertionError(f"diffusers tensor {key} mapped twice")
        self.out[key] = value.contiguous().clone()

    def copy(self, ours: str, theirs: str, names: tuple[str, ...] = ("weight", "bias")) -> None:
        """A layer with the same parameters on both sides (conv, linear, norm, embedding)."""
        for name in names:
            self.put(f"{theirs}.{name}", self.take(f"{ours}.{name}"))

    def resblock(self, ours: str, theirs: str) -> None:
        """Our ResBlock onto diffusers' ResnetBlock2D."""
        for a, b in (("in_norm", "norm1"), ("in_conv", "conv1"), ("emb_proj", "time_emb_proj"),
                     ("out_norm", "norm2"), ("out_conv", "conv2")):  # fmt: skip
            self.copy(f"{ours}.{a}", f"{theirs}.{b}")
        if f"{ours}.skip.weight" in self.ours:  # a 1x1 conv where the width changes, else the identity
            self.copy(f"{ours}.skip", f"{theirs}.conv_shortcut")

    def attention(self, ours: str, theirs: str) -> None:
        """Our AttentionBlock (qkv 1x1 conv with outputs laid out (3, heads, head_dim)) onto diffusers' Attention
        (to_q/to_k/to_v linear layers whose outputs are laid out (heads, head_dim), to_out.0)."""
        self.copy(f"{ours}.norm", f"{theirs}.group_norm")
        weight, bias = self.take(f"{ours}.qkv.weight"), self.take(f"{ours}.qkv.bias")
        channels = weight.shape[1]
        for i, name in enumerate(("to_q", "to_k", "to_v")):
            part = slice(i * channels, (i + 1) * channels)
            self.put(f"{theirs}.{name}.weight", weight[part].reshape(channels, channels))
            self.put(f"{theirs}.{name}.bias", bias[part])
        self.put(f"{theirs}.to_out.0.weight", self.take(f"{ours}.proj_out.weight").reshape(channels, channels))
        self.put(f"{theirs}.to_out.0.bias", self.take(f"{ours}.proj_out.bias"))

    def finish(self) -> dict[str, Tensor]:
        if unused := sorted(set(self.ours) - self.used):
            raise AssertionError(f"{len(unused)} of our tensors were not mapped (e.g. {unused[0]})")
        return self.out


def _layout_error(where: str, ours: nn.ModuleList, expected: str) -> AssertionError:
    return AssertionError(f"{where}: our layers {[type(m).__name__ for m in ours]} do not match diffusers' {expected}")


def diffusers_state_dict(net: UNet, unet: UNet2DModel) -> dict[str, Tensor]:
    """Our U-Net's state dict under the names of diffusers' ``unet`` (built by :func:`build_diffusers_unet` from the
    same config), walking both layouts block by block; every tensor of ours is used exactly once."""
    from ..nets.unet import AttentionBlock, Downsample, ResBlock, Upsample

    m = _StateMapper(net.state_dict())
    m.copy("time_embed.0", "time_embedding.linear_1")
    m.copy("time_embed.2", "time_embedding.linear_2")
    if net.label_emb is not None:
        m.copy("label_emb", "class_embedding", ("weight",))
    m.copy("input_conv", "conv_in")

    def attention(ours_layer: nn.Module, theirs_layer: nn.Module, ours: str, theirs: str) -> None:
        if ours_layer.num_heads != theirs_layer.heads:
            raise AssertionError(f"{ours}: {ours_layer.num_heads} heads, diffusers' {theirs}: {theirs_layer.heads}")
        m.attention(ours, theirs)

    def resampler(layer: nn.Module, plain: type, ours: str, theirs: str, theirs_layer: nn.Module) -> None:
        """A plain resampling conv (Downsample.op / Upsample.conv onto Downsample2D / Upsample2D .conv), or ADM's
        resampling ResBlock onto a ResnetBlock2D with down / up."""
        if isinstance(layer, plain) and type(theirs_layer).__name__ != "ResnetBlock2D":
            m.copy(f"{ours}.{'op' if plain is Downsample else 'conv'}", f"{theirs}.conv")
        elif isinstance(layer, ResBlock) and layer.resample and type(theirs_layer).__name__ == "ResnetBlock2D":
            m.resblock(ours, theirs)
        else:
            raise AssertionError(f"{ours}: {type(layer).__name__} does not match diffusers' "
                                 f"{type(theirs_layer).__name__} at {theirs}")

    down = iter(enumerate(net.down))
    for b, block in enumerate(unet.down_blocks):
        attns = getattr(block, "attentions", None)
        for j in range(len(block.resnets)):
            i, layers = next(down)
            want = [ResBlock] + ([AttentionBlock] if attns else [])
            if [type(x) for x in layers] != want:
                raise _layout_error(f"down.{i}", layers, f"down_blocks.{b} entry {j}")
            m.resblock(f"down.{i}.0", f"down_blocks.{b}.resnets.{j}")
            if attns:
                attention(layers[1], attns[j], f"down.{i}.1", f"down_blocks.{b}.attentions.{j}")
        if block.downsamplers is not None:
            i, layers = next(down)
            if len(layers) != 1:
                raise _layout_error(f"down.{i}", layers, f"down_blocks.{b}.downsamplers")
            resampler(layers[0], Downsample, f"down.{i}.0", f"down_blocks.{b}.downsamplers.0", block.downsamplers[0])
    if next(down, None) is not None:
        raise AssertionError("our U-Net has more down blocks than diffusers'")

    mid = unet.mid_block
    if [type(x) for x in net.middle] != [ResBlock, AttentionBlock, ResBlock] or len(mid.attentions) != 1:
        raise _layout_error("middle", net.middle, "mid_block")
    m.resblock("middle.0", "mid_block.resnets.0")
    attention(net.middle[1], mid.attentions[0], "middle.1", "mid_block.attentions.0")
    m.resblock("middle.2", "mid_block.resnets.1")

    up = iter(enumerate(net.up))
    for b, block in enumerate(unet.up_blocks):
        attns = getattr(block, "attentions", None)
        for j in range(len(block.resnets)):
            i, layers = next(up)
            last = j == len(block.resnets) - 1 and block.upsamplers is not None
            n = 1 + bool(attns) + last
            if len(layers) != n or type(layers[0]) is not ResBlock or (attns and type(layers[1]) is not AttentionBlock):
                raise _layout_error(f"up.{i}", layers, f"up_blocks.{b} entry {j}")
            m.resblock(f"up.{i}.0", f"up_blocks.{b}.resnets.{j}")
            if attns:
                attention(layers[1], attns[j], f"up.{i}.1", f"up_blocks.{b}.attentions.{j}")
            if last:
                resampler(layers[-1], Upsample, f"up.{i}.{n - 1}", f"up_blocks.{b}.upsamplers.0", block.upsamplers[0])
    if next(up, None) is not None:
        raise AssertionError("our U-Net has more up blocks than diffusers'")

    m.copy("out.0", "conv_norm_out")
    m.copy("out.2", "conv_out")
    return m.finish()


def to_diffusers_unet(net: UNet, net_config: Mapping[str, Any]) -> UNet2DModel:
    """diffusers' ``UNet2DModel`` holding the weights of our ``net`` (built from ``net_config``), in eval mode."""
    unet = build_diffusers_unet(net_config)
    unet.load_state_dict(diffusers_state_dict(net, unet), strict=True)
    return unet.eval()


def diffusers_scheduler(model: nn.Module) -> DDPMScheduler:
    """``DDPMScheduler`` with the model's betas, prediction type, fixed variance and its own sampler's x0 clipping
    (``clip_denoised``, default on; ``threshold``: diffusers' dynamic thresholding at that percentile, unbounded as
    ours). Timestep spacing "linspace" (our integer ``steps``), "leading" if the model's own steps are "ddimN"."""
    from diffusers import DDPMScheduler

    own = dict(model.sampler or {})
    steps, threshold = own.get("steps"), own.get("threshold")
    spacing = "leading" if isinstance(steps, str) and steps.startswith("ddim") else "linspace"
    extra: dict[str, Any] = {}
    if threshold is not None:  # ours: s = max(1, quantile); diffusers: clamp(quantile, 1, sample_max_value)
        extra = {"thresholding": True, "dynamic_thresholding_ratio": float(threshold), "sample_max_value": float("inf")}
    return DDPMScheduler(
        num_train_timesteps=model.diffusion.num_timesteps,
        trained_betas=model.diffusion.betas.tolist(),
        prediction_type=PREDICTION_TYPES[model.prediction_type],
        variance_type=model.variance_type,
        clip_sample=bool(own.get("clip_denoised", True)),
        clip_sample_range=1.0,
        timestep_spacing=spacing,
        **extra,
    )


