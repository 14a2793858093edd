"""The first stage of latent diffusion (Rombach et al. 2022, Sec. 3.1 and App. G): a KL-regularised autoencoder trained
with an L1 reconstruction under a learned output log-variance, an optional perceptual (LPIPS) term and an optional
PatchGAN discriminator with the hinge loss and the adaptive weight of Esser et al. (2021, eq. 7)."""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_lightning.images import to_uint8
from diffusion_lightning.nets.autoencoder import (
    AutoencoderKL,
    DiagonalGaussian,
    PatchDiscriminator,
    adaptive_gan_weight,
    hinge_d_loss,
)

from .base import OptimizerFactory, RunModule
from .first_stage import LatentSpace

log = logging.getLogger(__name__)


class Autoencoder(RunModule):
    """KL autoencoder (stage 1). The loss per image, as the reference's ``LPIPSWithDiscriminator``:

    L = sum_pixels [ r / e^s + s ] + kl_weight KL(q(z|x) || N(0, I)) + lambda d_weight g,   r = |x - x_rec| + w_p LPIPS

    with s a learned scalar log-variance, g = -mean D(x_rec) the generator's hinge loss, lambda the adaptive weight
    ||grad r|| / (||grad g|| + 1e-4) at the decoder's last layer, and the discriminator D trained on the hinge loss,
    both from step ``disc_start`` (``trainer.global_step`` counts autoencoder steps).

    Args:
        net: the :class:`~diffusion_lightning.nets.AutoencoderKL`.
        kl_weight: weight of the KL term (the reference: 1e-6).
        logvar_init: initial s.
        discriminator: a :class:`~diffusion_lightning.nets.PatchDiscriminator`, or None (no adversarial term).
        disc_start: the autoencoder step from which the adversarial terms are on.
        disc_weight: d_weight, the factor on the adaptive weight (the reference: 0.5).
        perceptual: None, or ``{"backbone_weights": path, "lin_weights": path}`` of local VGG16 and LPIPS head files
            (:class:`~diffusion_lightning.nets.LPIPS`); nothing is ever downloaded.
        perceptual_weight: w_p.
        optimizer: a factory ``optimizer(params)`` for the autoencoder and, separately, the discriminator; default
            Adam(lr=4.5e-6, betas=(0.5, 0.9)) as the reference.
        fid_extractor: the feature extractor of the test reconstruction FID (``fmnist-classifier``, ``inception``),
            or None; where it cannot be loaded the FID is skipped with one log line.
    """

    def __init__(
        self,
        net: AutoencoderKL,
        kl_weight: float = 1e-6,
        logvar_init: float = 0.0,
        discriminator: PatchDiscriminator | None = None,
        disc_start: int = 50001,
        disc_weight: float = 0.5,
        perceptual: Mapping[str, str] | None = None,
        perceptual_weight: float = 1.0,
        optimizer: OptimizerFactory | None = None,
        fid_extractor: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net", "discriminator", "optimizer"])
        self.automatic_optimization = False
        self.net, self.discriminator = net, discriminator
        self.kl_weight, self.disc_start, self.disc_weight = kl_weight, disc_start, disc_weight
        self.logvar = nn.Parameter(torch.full((), float(logvar_init)))
        self.perceptual_weight = perceptual_weight
        self.perceptual = None
        if perceptual:
            from diffusion_lightning.nets.lpips import LPIPS

            self.perceptual = LPIPS(**perceptual)
        elif perceptual_weight:
            log.warning("perceptual (LPIPS) loss off: no local weights given (model.perceptual="
                        "{backbone_weights: vgg16.pth, lin_weights: vgg.pth} turns it on; nothing is downloaded)")
        self.optimizer_factory: Callable[..., torch.optim.Optimizer] = optimizer or functools.partial(
            torch.optim.Adam, lr=4.5e-6, betas=(0.5, 0.9)
        )
        self.fid_extractor = fid_extractor
        self._test: dict[str, Any] = {}

    # ------------------------------------------------------------------ what stage 2 asks
    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.net.in_channels, self.net.image_size, self.net.image_size)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.net.latent_shape

    def encode(self, x: Tensor) -> DiagonalGaussian:
        """q(z | x) of images x in [-1, 1]."""
        return self.net.encode(x)

    def decode(self, z: Tensor) -> Tensor:
        """Images (about [-1, 1]) from latents z."""
        return self.net.decode(z)

    def latent_space(self, scale_factor: float | None = None, scale_batches: int = 16) -> LatentSpace:
        """A frozen copy of this autoencoder as a latent recipe's first stage (:class:`~.first_stage.LatentSpace`)."""
        return LatentSpace(copy.deepcopy(self.net), scale_factor, scale_batches)

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """decode(mode of q(z | x)), clamped to [-1, 1], in eval mode."""
        with self.eval_mode():
            return self.net.decode(self.net.encode(x.to(self.device)).mode()).clamp(-1, 1)

    # ------------------------------------------------------------------ loss
    def reconstruction_terms(self, x: Tensor, recon: Tensor, posterior: DiagonalGaussian) -> dict[str, Tensor]:
        """``nll`` (sum over pixels of r / e^s + s, mean over the batch), ``kl`` (mean over the batch) and ``l1``."""
        rec = (x - recon).abs()
        if self.perceptual is not None and self.perceptual_weight:
            rec = rec + self.perceptual_weight * self.perceptual(x, recon)[:, None, None, None]
        nll = rec / self.logvar.exp() + self.logvar
        batch = x.shape[0]
        return {"nll": nll.sum() / batch, "kl": posterior.kl().sum() / batch, "l1": (x - recon).abs().mean()}

    def adversarial_on(self) -> bool:
        return self.discriminator is not None and self.global_step >= self.disc_start

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x = batch[0]
        optimizers = self.optimizers()
        opt_ae = optimizers[0] if isinstance(optimizers, list) else optimizers
        recon, posterior = self.net(x)
        terms = self.reconstruction_terms(x, recon.float(), posterior)
        loss = terms["nll"] + self.kl_weight * terms["kl"]
        adversarial = self.adversarial_on()
        if adversarial:
            for p in self.discriminator.parameters():  # the generator step leaves the discriminator's gradients alone
                p.requires_grad_(False)
            g_loss = -self.discriminator(recon).float().mean()
            d_weight = self.disc_weight * adaptive_gan_weight(terms["nll"], g_loss, self.net.last_layer)
            loss = loss + d_weight * g_loss
            terms |= {"g_loss": g_loss, "d_weight": d_weight}
            for p in self.discriminator.parameters():
                p.requires_grad_(True)
        opt_ae.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        opt_ae.step()
        if adversarial:
            opt_d = optimizers[1]
            logits_real, logits_fake = self.discriminator(x).float(), self.discriminator(recon.detach()).float()
            d_loss = hinge_d_loss(logits_real, logits_fake)
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(d_loss)
            opt_d.optimizer.step()  # the raw optimizer: global_step counts autoencoder steps only
            terms |= {"d_loss": d_loss, "logits_real": logits_real.mean(), "logits_fake": logits_fake.mean()}
        self.watch_finite(loss)  # checked at logging steps and before every checkpoint (RunModule)
        if self.is_logging_step():
            self.log("train/loss", loss.detach(), prog_bar=True)
            self.log("train/logvar", self.logvar.detach())
            for name, value in terms.items():
                self.log(f"train/{name}", value.detach(), prog_bar=name == "l1")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x = batch[0]
        recon, posterior = self.net(x, sample_posterior=False)
        terms = self.reconstruction_terms(x, recon.float(), posterior)
        mse = F.mse_loss(recon.float().clamp(-1, 1), x, reduction="none").flatten(1).mean(1)
        self.log("val/l1", terms["l1"], prog_bar=True, sync_dist=True)
        self.log("val/kl", terms["kl"], sync_dist=True)
        self.log("val/psnr", (10 * torch.log10(4.0 / mse)).mean(), sync_dist=True)

    # ------------------------------------------------------------------ test: PSNR, SSIM, reconstruction FID
    def on_test_epoch_start(self) -> None:
        from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

        self._test = {
            "psnr": PeakSignalNoiseRatio(data_range=1.0).to(self.device),
            "ssim": StructuralSimilarityIndexMeasure(data_range=1.0).to(self.device),
            "real": [], "recon": [],
        }  # fmt: skip

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x = batch[0]
        recon = self.net.decode(self.net.encode(x).mode()).float().clamp(-1, 1)
        real01, recon01 = (x + 1) / 2, (recon + 1) / 2
        self._test["psnr"].update(recon01, real01)
        self._test["ssim"].update(recon01, real01)
        if self.fid_extractor:
            self._test["real"].append(to_uint8(x.cpu()))
            self._test["recon"].append(to_uint8(recon.cpu()))

    def on_test_epoch_end(self) -> None:
        self.log("test/psnr", self._test["psnr"].compute(), sync_dist=True)
        self.log("test/ssim", self._test["ssim"].compute(), sync_dist=True)
        if self.fid_extractor and self._test["real"]:
            if (fid := self._reconstruction_fid()) is not None:
                self.log("test/rfid", fid)
        self._test = {}

    def _reconstruction_fid(self) -> float | None:
        """FID between the test images and their reconstructions (this rank's share)."""
        from diffusion_lightning.metrics import fid_from_features, get_extractor

        try:
            extractor = get_extractor(self.fid_extractor, device=self.device, **(
                {"download": False} if self.fid_extractor == "inception" else {}))
        except (FileNotFoundError, ValueError) as e:
            log.warning(f"reconstruction FID skipped: {e}")
            return None
        real, recon = torch.cat(self._test["real"]), torch.cat(self._test["recon"])
        if extractor.name == "fmnist-classifier" and real.shape[1] != 1:
            log.warning("reconstruction FID skipped: the fmnist-classifier takes one-channel images")
            return None
        feats = [torch.cat([extractor(part[i : i + 256])["features"] for i in range(0, len(part), 256)])
                 for part in (real, recon)]
        return fid_from_features(*feats)

    # ------------------------------------------------------------------ optimisers
    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        ae = self.optimizer_factory([*self.net.parameters(), self.logvar])
        if self.discriminator is None:
            return [ae]
        return [ae, self.optimizer_factory(self.discriminator.parameters())]
