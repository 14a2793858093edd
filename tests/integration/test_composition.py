"""Recipes as compositions (issue 29): every recipe trains and samples with either first stage (pixels, a latent
autoencoder) and each condition kind it accepts (none, class labels, label tokens through cross-attention, a
low-resolution image concatenated to the input); classifier-free guidance at w = 0 and w = 1 is the unconditional and
the conditional denoiser for every condition kind; condition dropout drops a whole condition jointly.

Everything is built in Python from tiny components (no config files): 8x8 one-channel images, a U-Net of width 8, and
an autoencoder with 2x4x4 latents.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from diffusion_lightning.diffusion import Denoiser, Guided
from diffusion_lightning.diffusion.conditioning import Condition, drop_condition, null_condition
from diffusion_lightning.diffusion.denoisers import append_dims, sigma_batch
from diffusion_lightning.errors import UserError
from diffusion_lightning.models import (
    DDPM,
    EDM,
    ConsistencyDistillation,
    ConsistencyTraining,
    ConsistencyTuning,
    ContinuousDiffusion,
    DiffusionModel,
    FlowMatching,
    ImprovedDDPM,
    LatentSpace,
    ProgressiveDistillation,
)
from diffusion_lightning.models.conditioners import LabelTokens, LowResolution
from diffusion_lightning.nets import AutoencoderKL, UNet

NUM_CLASSES = 3
IMAGE = (1, 8, 8)  # the images of every composition
SPACES = ("pixels", "latents")
CONDITIONS = ("none", "labels", "tokens", "image")
TEACHERS = ("ddpm", "continuous")  # the students' teachers (variance-preserving recipes)
STUDENTS = ("pd", "cd", "ect")
RECIPES = ("ddpm", "iddpm", "continuous", "edm", "fm", "ct", *STUDENTS)
# sampler overrides of sample() and the network evaluations per sample they cost (no guidance)
SAMPLING = {
    "ddpm": ({"steps": 4}, 4),  # the model's ddim
    "iddpm": ({"name": "ddpm", "steps": 4}, 4),  # ancestral, with the learned variance
    "continuous": ({"steps": 4}, 4),
    "edm": ({"steps": 3}, 5),  # Heun: 2N - 1
    "fm": ({"name": "heun", "steps": 3}, 5),  # the model's euler by default; Heun on the uniform t grid
    "ct": ({"steps": 2}, 2),  # multistep consistency sampling through mid_sigmas
    "pd": ({}, 2),  # the student's own step count (start_steps 4 -> 2)
    "cd": ({"steps": 2}, 2),
    "ect": ({}, 1),
}


# ---------------------------------------------------------------------------------------------- components
def space_shape(space: str) -> tuple[int, int]:
    """(channels, side) of what the network sees: the image, or the autoencoder's latent."""
    return (IMAGE[0], IMAGE[1]) if space == "pixels" else (2, 4)


def first_stage(space: str) -> LatentSpace | None:
    if space == "pixels":
        return None
    ae = AutoencoderKL(image_size=IMAGE[1], in_channels=IMAGE[0], ch=8, ch_mult=(1, 2), num_res_blocks=1,
                       z_channels=2, attention=False, num_groups=4)  # fmt: skip
    return LatentSpace(ae, scale_factor=1.0)


def unet(space: str, condition: str, out_channels: int | None = None) -> UNet:
    channels, side = space_shape(space)
    return UNet(image_size=side, in_channels=channels, out_channels=out_channels, model_channels=8,
                channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(side // 2,) if condition == "tokens"
                else (), dropout=0.0, num_groups=4, num_classes=NUM_CLASSES if condition == "labels" else None,
                context_dim=8 if condition == "tokens" else None,
                cond_channels=IMAGE[0] if condition == "image" else 0)  # fmt: skip


def conditioner(space: str, condition: str) -> torch.nn.Module | None:
    """None: the recipe's default (the class labels when the network has classes, else no condition)."""
    if condition == "tokens":
        return LabelTokens(num_classes=NUM_CLASSES, length=2, dim=8)
    if condition == "image":
        return LowResolution(factor=2, size=space_shape(space)[1])
    return None


def teacher_of(recipe: str, condition: str) -> str:
    """Each student meets both teacher kinds across the condition kinds."""
    return TEACHERS[(RECIPES.index(recipe) + CONDITIONS.index(condition)) % 2]


def build(recipe: str, space: str, condition: str) -> DiffusionModel:
    """``recipe`` composed with the first stage of ``space`` and the conditioner of ``condition`` (a student: with a
    teacher of that composition)."""
    torch.manual_seed(0)
    if recipe in STUDENTS:
        teacher = build(teacher_of(recipe, condition), space, condition)
        if recipe == "pd":
            return ProgressiveDistillation(teacher=teacher, start_steps=4, end_steps=2, steps_per_round=2,
                                           compile=False)  # fmt: skip
        if recipe == "cd":
            return ConsistencyDistillation(teacher=teacher, num_levels=4, compile=False)
        return ConsistencyTuning(teacher=teacher, steps_per_stage=1, compile=False)
    kw = dict(first_stage=first_stage(space), conditioner=conditioner(space, condition), compile=False,
              channels_last=False, class_dropout=0.0 if condition == "none" else 0.2)  # fmt: skip
    if recipe == "ddpm":
        # T = 40: the linear schedule scaled by 1000 / T reaches beta_T = 1 (sigma_max = inf) at T = 20
        return DDPM(unet(space, condition), num_timesteps=40, **kw)
    if recipe == "iddpm":
        return ImprovedDDPM(unet(space, condition, out_channels=2 * space_shape(space)[0]), num_timesteps=20, **kw)
    if recipe == "continuous":
        return ContinuousDiffusion(unet(space, condition), **kw)
    if recipe == "edm":
        return EDM(unet(space, condition), **kw)
    if recipe == "fm":  # OT pairing of noise and data: conditions stay with their images
        return FlowMatching(unet(space, condition), coupling="ot", **kw)
    assert recipe == "ct"
    return ConsistencyTraining(unet(space, condition), total_steps=2, s0=2, s1=4, **kw)


def condition_for(model: DiffusionModel, condition: str, n: int, generator: torch.Generator) -> dict:
    """sample()'s condition arguments: labels (made into tokens by a token conditioner) or the image itself."""
    if condition in ("labels", "tokens"):
        return {"y": torch.arange(n) % NUM_CLASSES}
    if condition == "image":
        side = model.sample_shape[-1]
        return {"cond": Condition(image=torch.rand(n, IMAGE[0], side, side, generator=generator) * 2 - 1)}
    return {}


# ---------------------------------------------------------------------------------------------- train and sample
COMPOSITIONS = [(recipe, space, condition) for recipe in RECIPES for space in SPACES for condition in CONDITIONS]


@pytest.mark.slow
@pytest.mark.parametrize(("recipe", "space", "condition"), COMPOSITIONS, ids=["-".join(c) for c in COMPOSITIONS])
def test_every_composition_trains_two_steps_and_samples(recipe, space, condition, tmp_path):
    """Two optimizer steps under Lightning change the network (and a recipe's own tokens) and leave a frozen first
    stage and teacher alone, with a finite loss; sampling gives finite images of the model's shape at the cost its
    sampler settings give."""
    model = build(recipe, space, condition)
    student = recipe in STUDENTS
    if student:  # the teacher's first stage and conditioner, registered once (under the teacher)
        assert model.first_stage is model.teacher.first_stage and model.conditioner is model.teacher.conditioner
        assert not any(k.startswith(("first_stage.", "conditioner.")) for k in model.state_dict())
    assert model.image_shape == IMAGE
    assert model.sample_shape == (space_shape(space)[0], *[space_shape(space)[1]] * 2)
    assert (model.num_classes == NUM_CLASSES) == (condition in ("labels", "tokens"))

    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, *IMAGE, generator=g) * 2 - 1
    y = torch.randint(0, NUM_CLASSES, (8,), generator=g)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = L.Trainer(max_steps=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
                        default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=4))
    assert trainer.global_step == 2
    loss = trainer.callback_metrics["train/loss"]
    assert torch.isfinite(loss), f"training loss {loss}"
    after = dict(model.named_parameters())
    trained = [n for n, p in after.items() if p.requires_grad and not torch.equal(p, before[n])]
    assert any(n.startswith("net.") for n in trained), "the network's weights did not change"
    frozen = [n for n in after if n.startswith(("first_stage.", "teacher."))]
    assert all(torch.equal(after[n], before[n]) for n in frozen), "a frozen first stage or teacher was trained"
    assert bool(frozen) == (space == "latents" or student)
    if condition == "tokens" and not student:  # the learned tokens are the recipe's own and train with it
        assert any(n.startswith("conditioner.") for n in trained)

    overrides, nfe = SAMPLING[recipe]
    g = torch.Generator().manual_seed(1)
    images, counted = model.sample(2, generator=g, return_nfe=True, **condition_for(model, condition, 2, g),
                                   **overrides)  # fmt: skip
    assert images.shape == (2, *IMAGE)
    assert torch.isfinite(images).all()
    assert counted == nfe


def test_students_refuse_their_own_first_stage_and_conditioner():
    teacher = build("continuous", "pixels", "labels")
    for cls in (ConsistencyDistillation, ConsistencyTuning):
        with pytest.raises(UserError, match="teacher's"):
            cls(teacher=teacher, first_stage=first_stage("latents"))
        with pytest.raises(UserError, match="teacher's"):
            cls(teacher=teacher, conditioner=LabelTokens(NUM_CLASSES, 2, 8))
    with pytest.raises(TypeError):  # no such argument at all
        ProgressiveDistillation(teacher=teacher, first_stage=first_stage("latents"))


# ---------------------------------------------------------------------------------------------- guidance
# Guided wraps whatever denoiser a recipe presents: one recipe per adapter (discrete VP, discrete VP with a learned
# variance, EDM preconditioning, the flow adapter, the consistency function, a student's continuous VP time) covers
# them all
GUIDED = [(recipe, space, condition) for recipe, space, condition in COMPOSITIONS
          if condition != "none" and recipe in ("ddpm", "iddpm", "edm", "fm", "ct", "pd")]  # fmt: skip


@pytest.mark.parametrize(("recipe", "space", "condition"), GUIDED, ids=["-".join(c) for c in GUIDED])
def test_guidance_zero_and_one_are_the_unconditional_and_conditional_denoisers(recipe, space, condition):
    """Ho & Salimans (2022) eq. 6 at w = 0 and w = 1, for labels, tokens and images alike: the network under the null
    condition (the null class, zero tokens all attended, a zero image) and under the condition itself."""
    model = build(recipe, space, condition).eval()
    assert model.class_dropout > 0
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():  # the zero-initialised output layers would hide any dependence on the condition
            p.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(2)
    n = 3
    x = torch.randn(n, *model.sample_shape, generator=g)
    sigma = torch.tensor([0.4, 1.0, 2.5])
    given = condition_for(model, condition, n, g)
    cond = given["cond"] if "cond" in given else model.condition(None, given["y"])
    null = null_condition(cond, model.num_classes)
    den = model.denoiser()
    with torch.no_grad():
        conditional, unconditional = den(x, sigma, cond), den(x, sigma, null)
        assert (conditional - unconditional).abs().max() > 1e-3, "the condition does not change the output"
        tol = dict(rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(Guided(den, 0.0, null_label=model.num_classes)(x, sigma, cond), unconditional,
                                   **tol)  # fmt: skip
        torch.testing.assert_close(Guided(den, 1.0, null_label=model.num_classes)(x, sigma, cond), conditional,
                                   **tol)  # fmt: skip
        torch.testing.assert_close(model.guided_denoiser(0.0)(x, sigma, cond), unconditional, **tol)
        torch.testing.assert_close(model.guided_denoiser(1.0)(x, sigma, cond), conditional, **tol)
        torch.testing.assert_close(model.guided_denoiser(3.0)(x, sigma, cond),
                                   unconditional + 3 * (conditional - unconditional), rtol=1e-4, atol=1e-4)

        if den.learned_variance:  # a guided learned variance is the conditional one's, at every w (as GLIDE)
            torch.testing.assert_close(model.guided_denoiser(0.0).predict(x, sigma, cond)[1],
                                       den.predict(x, sigma, cond)[1], **tol)  # fmt: skip

    # and through the sampler: sampling under w = 0 is sampling under the null condition, unguided (with a fixed
    # variance: the learned one stays the conditional one's, above)
    overrides = {**SAMPLING[recipe][0], **({"variance_type": "fixed_small"} if den.learned_variance else {})}
    noise = torch.randn(n, *model.sample_shape, generator=g)

    def draw(c, w):
        return model.sample(noise=noise, cond=c, guidance=w, generator=torch.Generator().manual_seed(3), **overrides)

    # float rounding of the doubled (guided) batch against the single one; the flow model starts its ODE at sigma = 1e4
    # (t_max = 0.9999) and its Heun step carries a little more of it (1.6e-4 seen on 1 of 192 values)
    tol = 4e-4 if recipe == "fm" else 1e-4
    torch.testing.assert_close(draw(cond, 0.0), draw(null, 1.0), rtol=tol, atol=tol)
    assert not torch.allclose(draw(cond, 1.0), draw(null, 1.0), atol=1e-3)


class SigmaRecorder(Denoiser):
    """Returns the sigma it was called with, per sample, and records it."""

    sigma_min, sigma_max = 0.002, 80.0

    def __init__(self) -> None:
        self.seen: list = []

    def predict(self, x, sigma, y=None):
        self.seen.append(sigma)
        return append_dims(sigma_batch(sigma, x), x.ndim).expand_as(x), None


def test_guided_passes_a_float64_sigma_on_unrounded():
    s = 0.1 + 1e-12
    assert torch.tensor(s, dtype=torch.float32).item() != s  # float32 would round it
    x = torch.randn(2, 1, 2, 2, dtype=torch.float64)
    y = torch.tensor([0, 1])
    for sigma in (s, torch.tensor(s, dtype=torch.float64)):
        inner = SigmaRecorder()
        out = Guided(inner, 2.5, null_label=NUM_CLASSES)(x, sigma, y)
        (seen,) = inner.seen  # one call on the doubled batch
        assert float(seen) == s and (not isinstance(seen, torch.Tensor) or seen.dtype == torch.float64)
        assert out.dtype == torch.float64 and torch.all(out == s)
    per_sample = torch.tensor([s, 0.7 + 1e-13], dtype=torch.float64)
    inner = SigmaRecorder()
    Guided(inner, 2.5, null_label=NUM_CLASSES)(x, per_sample, y)
    assert inner.seen[0].dtype == torch.float64
    assert torch.equal(inner.seen[0], torch.cat([per_sample, per_sample]))


# ---------------------------------------------------------------------------------------------- dropout
def test_condition_dropout_replaces_the_whole_condition_jointly_at_rate_p():
    torch.manual_seed(0)
    n, p = 4000, 0.5
    mask = torch.rand(n, 3) < 0.7
    mask[:, 0] = False  # never all-attended: distinct from the null mask
    cond = Condition(label=torch.randint(0, NUM_CLASSES, (n,)), context=torch.randn(n, 3, 4) + 5.0, context_mask=mask,
                     image=torch.randn(n, 1, 2, 2) + 5.0)  # fmt: skip
    dropped = drop_condition(cond, p, NUM_CLASSES)
    null = null_condition(cond, NUM_CLASSES)
    per_field = {}
    for name, value in dropped.tensors().items():
        flat, original, nulled = (v.reshape(n, -1) for v in (value, cond.tensors()[name], null.tensors()[name]))
        is_null, kept = (flat == nulled).all(1), (flat == original).all(1)
        assert torch.all(is_null ^ kept), f"{name}: a sample is neither kept nor nulled"
        per_field[name] = is_null
    masks = list(per_field.values())
    assert all(torch.equal(m, masks[0]) for m in masks[1:]), "the fields were dropped independently"
    assert masks[0].float().mean().item() == pytest.approx(p, abs=0.03)
    assert per_field.keys() == {"label", "context", "context_mask", "image"}
    assert drop_condition(cond, 0.0, NUM_CLASSES) is cond
