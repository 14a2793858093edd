"""The speed options (issue 20): each computes the same function as without it, within its precision's tolerance, and
training with it on still lowers the loss; and a training step makes no host-device synchronisation between logging
steps."""

from __future__ import annotations

import functools
import logging

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from diffusion_lightning.callbacks import EMA, ProgressBar
from diffusion_lightning.models import DDPM
from diffusion_lightning.models import speed as model_base
from diffusion_lightning.models.base import weighted_mean
from diffusion_lightning.nets import UNet
from diffusion_lightning.nets.unet import AttentionBlock

TINY = dict(image_size=8, in_channels=1, model_channels=8, channel_mult=[1, 2], num_res_blocks=1,
            attention_resolutions=[4], num_groups=4, dropout=0.0)


def tiny_ddpm(**kwargs) -> DDPM:
    torch.manual_seed(0)
    kwargs.setdefault("optimizer", functools.partial(torch.optim.AdamW, lr=3e-3))
    model = DDPM(UNet(**TINY), num_timesteps=100, **kwargs)
    with torch.no_grad():  # the zero-initialised output layers would make every option trivially agree
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape))  # (randn_like would fill channels-last weights in another order)
    return model


def data(n: int = 32) -> torch.Tensor:
    """Images with structure the model can learn quickly: a bright square on a dark background."""
    g = torch.Generator().manual_seed(1)
    x = -torch.ones(n, 1, 8, 8)
    for i in range(n):
        r, c = torch.randint(0, 5, (2,), generator=g).tolist()
        x[i, :, r:r + 3, c:c + 3] = 1.0
    return x


def fixed_loss(model: DDPM, x0: torch.Tensor) -> float:
    """L_simple on fixed t and noise, in eval mode (a deterministic measure of the fit)."""
    g = torch.Generator().manual_seed(2)
    t = torch.randint(0, 100, (len(x0),), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    with torch.no_grad(), model.eval_mode():
        model.eval()
        out = model(model.diffusion.q_sample(x0, t, noise), t)
    return float(F.mse_loss(out.float(), noise))


def train_steps(model: DDPM, x0: torch.Tensor, steps: int, autocast: bool = False) -> None:
    optimizer = model.configure_optimizers()["optimizer"]
    model.train()
    for i in range(steps):
        batch = x0[(i * 8) % len(x0):][:8]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = weighted_mean(model.loss(batch, None))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def assert_trains(model: DDPM, steps: int = 40, autocast: bool = False) -> None:
    x0 = data()
    before = fixed_loss(model, x0)
    train_steps(model, x0, steps, autocast)
    after = fixed_loss(model, x0)
    assert after < 0.6 * before, (before, after)


def test_channels_last_same_function_and_trains() -> None:
    ref, cl = tiny_ddpm(channels_last=False), tiny_ddpm(channels_last=True)
    assert next(p for p in cl.net.parameters() if p.ndim == 4).is_contiguous(memory_format=torch.channels_last)
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([0, 10, 50, 99])
    torch.testing.assert_close(cl(x, t), ref(x, t), atol=1e-5, rtol=1e-5)
    assert_trains(cl)


def test_bf16_autocast_same_function_within_bf16_and_trains() -> None:
    model = tiny_ddpm().eval()
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([0, 10, 50, 99])
    ref = model(x, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t)
    assert out.dtype == torch.bfloat16
    # bf16 keeps 8 bits of mantissa: relative error of a few 2^-8 through the network
    assert (out.float() - ref).norm() < 0.03 * ref.norm()
    # the loss is computed in float32 from the bf16 output
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = model.train().loss(data(8), None)
    assert loss.dtype == torch.float32
    assert_trains(model, autocast=True)


def test_fused_adamw_same_update_and_trains() -> None:
    a, b = tiny_ddpm(), tiny_ddpm()
    opt_a = torch.optim.AdamW(a.parameters(), lr=1e-3, weight_decay=0.01, fused=False)
    opt_b = torch.optim.AdamW(b.parameters(), lr=1e-3, weight_decay=0.01, fused=True)
    for step in range(3):  # the same gradients into both (Adam's update amplifies differences of tiny gradients)
        torch.manual_seed(step)
        weighted_mean(a.loss(data(8), None)).backward()
        for p, q in zip(a.parameters(), b.parameters(), strict=True):
            q.grad = p.grad.clone()
        opt_a.step(), opt_b.step()
        opt_a.zero_grad(), opt_b.zero_grad()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)
    b.optimizer_factory = functools.partial(torch.optim.AdamW, lr=3e-3, fused=True)
    assert_trains(b)


def test_default_config_uses_fused_adamw(compose_train) -> None:
    from hydra.utils import instantiate

    model = instantiate(compose_train([]).model, _convert_="all")
    assert model.configure_optimizers()["optimizer"].defaults["fused"] is True
    assert model.channels_last is torch.cuda.is_available() and model.compile is None


def test_sdpa_attention_is_softmax_attention() -> None:
    torch.manual_seed(0)
    block = AttentionBlock(16, num_heads=2, num_groups=4)
    torch.nn.init.normal_(block.proj_out.weight)
    x = torch.randn(3, 16, 4, 4)
    B, C, H, W = x.shape
    q, k, v = block.qkv(block.norm(x)).reshape(B, 3, 2, C // 2, H * W).unbind(1)  # (B, heads, d, HW)
    weights = torch.softmax(torch.einsum("bhdi,bhdj->bhij", q, k) / (C // 2) ** 0.5, dim=-1)
    h = torch.einsum("bhij,bhdj->bhdi", weights, v).reshape(B, C, H, W)
    torch.testing.assert_close(block(x), x + block.proj_out(h), atol=1e-5, rtol=1e-5)


def test_compile_same_function_and_trains() -> None:
    """torch.compile (inductor; on CPU it needs a C++ compiler and takes about a minute here)."""
    model = tiny_ddpm(compile=True)
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([0, 10, 50, 99])
    model.train()
    out = model(x, t)
    assert isinstance(model_base._COMPILED[model.net], model_base._EagerFallback)
    assert model_base._COMPILED[model.net].compiled_net is not None, "compilation fell back to eager"
    model.compile = False
    torch.testing.assert_close(out, model(x, t), atol=1e-5, rtol=1e-5)
    model.compile = True
    assert "_orig_mod" not in "".join(model.state_dict())  # checkpoints keep their keys
    assert_trains(model, steps=40)


def test_compile_failure_falls_back_to_eager(monkeypatch, caplog) -> None:
    def broken_compile(net):
        def call(*args):
            raise RuntimeError("backend exploded\nsecond line")
        return call

    monkeypatch.setattr(torch, "compile", broken_compile)
    model = tiny_ddpm(compile=True).train()
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([0, 10, 50, 99])
    with caplog.at_level(logging.WARNING):
        out = model(x, t)
    assert "torch.compile failed (RuntimeError: backend exploded)" in caplog.text
    assert "model.compile=false" in caplog.text
    torch.testing.assert_close(out, model.net(x, t))
    model_base._COMPILED.pop(model.net)


class _NoSync(L.Callback):
    """Between the start and the end of every non-logging training batch, fail on any read of a tensor's value on the
    host (what a GPU would have to wait for)."""

    READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy")

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.monkeypatch, self.watched, self.reads = monkeypatch, 0, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer._logger_connector.should_update_logs:
            return
        self.watched += 1
        for name in self.READS:
            original = getattr(torch.Tensor, name)

            def read(tensor, *args, _name=name, _original=original, **kwargs):
                if tensor.numel() > 0 and not getattr(tensor, "_host_ok", False):
                    import traceback

                    self.reads.append((_name, "".join(traceback.format_stack(limit=6)[:-1])))
                return _original(tensor, *args, **kwargs)

            self.monkeypatch.setattr(torch.Tensor, name, read)

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.monkeypatch.undo()


def test_training_step_reads_nothing_from_the_device_between_logging_steps(monkeypatch, tmp_path) -> None:
    """The loss, its per-quarter statistics, the NaN watch, the gradient norm, the EMA update and the progress bar
    keep their values on the device except at logging steps. On a CPU a read costs nothing, so the test watches the
    reads themselves (on a GPU, ``scripts/gpu_bench.sh`` runs the same with ``torch.cuda.set_sync_debug_mode``)."""
    model = tiny_ddpm()
    model.optimizer_factory = lambda params: torch.optim.AdamW(params, lr=1e-3, fused=True)
    watch = _NoSync(monkeypatch)
    x0 = data(64)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=12, log_every_n_steps=5, gradient_clip_val=1.0, logger=False,
        enable_checkpointing=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=[EMA(decay=0.99), ProgressBar(), watch], default_root_dir=tmp_path,
    )
    trainer.fit(model, DataLoader(TensorDataset(x0, torch.zeros(64).long()), batch_size=8))
    assert watch.watched >= 8
    assert not watch.reads, "host reads in training steps:\n" + "\n".join(f"{n}:\n{s}" for n, s in watch.reads[:3])


def test_bf16_mixed_trainer_with_fused_adamw_clips_gradients(tmp_path) -> None:
    """Lightning refuses fused optimisers with clipping under any mixed precision; the model clips them itself where
    no fp16 gradient scaler is in use, and the clipped gradients reach the optimiser."""
    norms = []

    class GradNorm(L.Callback):
        def on_before_zero_grad(self, trainer, pl_module, optimizer):  # the previous step's (clipped) gradients
            if (grads := [p.grad for p in pl_module.parameters() if p.grad is not None]):
                norms.append(float(torch.nn.utils.get_total_norm(grads)))

    model = tiny_ddpm()
    model.optimizer_factory = functools.partial(torch.optim.AdamW, lr=1e-3, fused=True)
    x0 = data(32)
    trainer = L.Trainer(
        accelerator="cpu", precision="bf16-mixed", max_steps=4, gradient_clip_val=1e-3, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        callbacks=[GradNorm()], default_root_dir=tmp_path,
    )
    trainer.fit(model, DataLoader(TensorDataset(x0, torch.zeros(32).long()), batch_size=8))
    assert len(norms) == 3 and all(n <= 1e-3 * (1 + 1e-4) for n in norms), norms


def test_cpu_trainer_precision_is_bf16_exactly_where_the_cpu_has_native_bf16(compose_train) -> None:
    from diffusion_lightning import cpu_precision

    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert cpu_precision() == ("bf16-mixed" if native else "32-true")
    assert compose_train([]).trainer.precision == cpu_precision()
    assert compose_train(["trainer=gpu"]).trainer.precision == "bf16-mixed"
