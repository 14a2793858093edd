"""Export a trained pixel DDPM checkpoint to diffusers' pipeline format:
``python -m diffusion_lightning.export ckpt=PATH out=DIR [ema=false]``.

DIR gets the layout of ``diffusers.DDPMPipeline.save_pretrained``: ``unet/`` a ``UNet2DModel`` with the checkpoint's
EMA (``ema=false``: raw) weights mapped tensor for tensor onto diffusers' names (the layout of
:func:`~diffusion_lightning.bench_diffusers.diffusers_unet`), ``scheduler/`` a ``DDPMScheduler`` with the same betas
(``trained_betas``), prediction type and fixed variance, and x0 clipping as the model's own sampler. Usage::

    from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline
    pipe = DDPMPipeline.from_pretrained("DIR")
    images = pipe(num_inference_steps=100).images  # at most model.num_timesteps (the pipeline's default is 1000)
    ddim = DDIMPipeline(pipe.unet, DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="leading"))
    images = ddim(num_inference_steps=50, use_clipped_model_output=True).images  # as our sampler=ddim steps=ddim50

Which samplers agree with ours (tests/test_export.py): ``DDPMScheduler`` (``timestep_spacing="linspace"``, as exported)
with N steps runs our ``sampler=ddpm sampler.steps=N``: the timesteps of our respacing and, for an unconditional model,
the same images from the same CPU generator (both draw the start noise, then one noise per step). diffusers'
``DDIMScheduler`` always steps from t to t - T // N, so it agrees with our DDIM with ``timestep_spacing="leading"``
and ``steps="ddimN"`` where N divides T (then both visit 0, T/N, 2T/N, ...; with "linspace" only for N = T); use
``use_clipped_model_output=True``: our DDIM recomputes eps from the clipped x0. A class-conditional model's
``UNet2DModel`` takes ``class_labels`` (label ``num_classes`` is the guidance null class), but diffusers' DDPM/DDIM
pipelines pass none: run the scheduler loop yourself.

Refused with the option to change: a learned-variance model (``model.variance_type=learned_range``, 2C outputs),
models other than a pixel :class:`~diffusion_lightning.models.DDPM` / ``ImprovedDDPM`` (latent diffusion,
continuous-time, distilled and consistency models), and U-Net options diffusers' ``UNet2DModel`` cannot express
(``channel_mult[0] != 1``; ``num_heads > 1`` over attention blocks of different widths: use ``num_head_channels``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from omegaconf import DictConfig
from torch import Tensor, nn

from .checkpoint import model_from_checkpoint
from .errors import UserError, run_entry
from .utils import run_or_exit

if TYPE_CHECKING:
    from diffusers import DDPMScheduler, UNet2DModel

    from .nets import UNet

#: Our prediction types as diffusers names them.
PREDICTION_TYPES = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}


def check_exportable(model: nn.Module) -> None:
    """Raise a :class:`UserError` naming the reason if ``model`` cannot become a diffusers DDPM pipeline."""
    from .models import DDPM, PixelSpace
    from .nets import UNet

    name = type(model).__name__
    if not isinstance(model, DDPM) or type(model.first_stage) is not PixelSpace:
        raise UserError(
            f"cannot export a {name} checkpoint: only pixel DDPM checkpoints export (models.DDPM or "
            "models.ImprovedDDPM: a U-Net on images over a discrete beta schedule, as diffusers' DDPMPipeline runs). "
            "Latent diffusion, continuous-time, progressive-distillation and consistency models have no "
            "diffusers DDPM equivalent"
        )
    if model.learned_variance:
        raise UserError(
            f"cannot export this {name}: it learns its variance (model.variance_type={model.variance_type}, "
            f"model.net.out_channels={model.net.out_channels} = 2C). The export targets fixed-variance models, whose "
            "C-channel output every diffusers scheduler (DDIM, DPM-Solver, ...) reads: train with "
            "model.variance_type=fixed_small or fixed_large and model.net.out_channels=C"
        )
    if model.variance_type not in ("fixed_small", "fixed_large"):
        raise UserError(f"cannot export model.variance_type={model.variance_type}: use fixed_small or fixed_large")
    if model.prediction_type not in PREDICTION_TYPES:
        raise UserError(f"cannot export model.prediction_type={model.prediction_type}: use one of eps, x0, v")
    if not isinstance(model.net, UNet):
        raise UserError(f"cannot export a {type(model.net).__name__} network: only diffusion_lightning.nets.UNet maps "
                        "onto diffusers' UNet2DModel")


def net_config_of(model: nn.Module) -> dict[str, Any]:
    """The U-Net keyword arguments a model was built with, from its run config (``model.net``)."""
    run_config = getattr(model, "run_config", None) or {}
    net = (run_config.get("model") or {}).get("net")
    if not net:
        raise UserError("the model has no run config with model.net (it was not loaded from a training checkpoint): "
                        "pass net_config, the U-Net's keyword arguments")
    return dict(net)


def build_diffusers_unet(net_config: Mapping[str, Any]) -> UNet2DModel:
    """diffusers' ``UNet2DModel`` laid out as ``UNet(**net_config)``; options it cannot express raise UserError."""
    from .bench_diffusers import diffusers_unet

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
    from .nets.unet import AttentionBlock, Downsample, ResBlock, Upsample

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


def export_model(model: nn.Module, out: str | Path, net_config: Mapping[str, Any] | None = None) -> Path:
    """Write ``model`` (a pixel DDPM; :func:`check_exportable`) to ``out`` as a diffusers ``DDPMPipeline``.
    ``net_config``: the U-Net's keyword arguments (default: the model's run config)."""
    from diffusers import DDPMPipeline

    check_exportable(model)
    unet = to_diffusers_unet(model.net, net_config if net_config is not None else net_config_of(model))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    DDPMPipeline(unet=unet, scheduler=diffusers_scheduler(model)).save_pretrained(out)
    return out


def export_from_config(cfg: DictConfig) -> Path:
    try:
        import diffusers  # noqa: F401
    except ImportError:
        raise UserError("the export needs diffusers: pip install diffusers (or make install, with the dev "
                        "extras)") from None
    model = model_from_checkpoint(cfg.ckpt, ema=cfg.ema)
    out = export_model(model, cfg.out)
    params = sum(p.numel() for p in model.net.parameters())
    print(f"wrote diffusers DDPMPipeline to {out} (UNet2DModel, {params:,d} parameters, {'EMA' if cfg.ema else 'raw'} "
          f"weights; DDPMScheduler T={model.diffusion.num_timesteps}, prediction_type="
          f"{PREDICTION_TYPES[model.prediction_type]}, variance_type={model.variance_type})")
    return out


@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
def main(cfg: DictConfig) -> None:
    run_or_exit(export_from_config, cfg)


if __name__ == "__main__":
    run_entry(main, "export")
