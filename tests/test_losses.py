"""AsymLoss: hand-computed terms, the GAN schedule, the adaptive weight, LPIPS offline handling."""

import math
import os

import pytest
import torch
import torch.nn as nn

from ldm_asym.losses import LPIPS_TRUNK_FILES, AsymLoss, check_lpips_weights, lpips_trunk_path

LOG_KEYS = {"loss/total", "loss/nll", "loss/l1", "loss/lpips", "loss/kl", "loss/g", "loss/d_weight", "loss/disc_factor"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def loss_fn(one_thread):
    torch.manual_seed(0)
    return AsymLoss(lpips_pretrained=False, disc_start=10)


def images(seed=0, b=2, h=32, w=32):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 3, h, w, generator=g) * 2 - 1
    y = (x + 0.3 * torch.randn(b, 3, h, w, generator=g)).clamp(-1, 1)
    return x, y


class ConstD(nn.Module):
    """A fake discriminator returning queued logits (for the discriminator loss)."""

    def __init__(self, *outputs):
        super().__init__()
        self.outputs = list(outputs)

    def forward(self, x):
        return self.outputs.pop(0)


class LinearD(nn.Module):
    """D(r) = c * r: g = -c * mean(r), so its gradient is known in closed form."""

    def __init__(self, c):
        super().__init__()
        self.c = c

    def forward(self, x):
        return self.c * x


@pytest.fixture
def set_disc(loss_fn):
    """Swap the discriminator for a fake one for one test (pytest's monkeypatch cannot restore
    nn.Module submodules: it looks in the instance __dict__, and modules live in `_modules`)."""
    real = loss_fn.discriminator

    def swap(fake):
        loss_fn.discriminator = fake

    yield swap
    loss_fn.discriminator = real


def count_calls(module):
    calls = []
    handle = module.register_forward_hook(lambda *a: calls.append(1))
    return calls, handle


# ---------------------------------------------------------------------- reconstruction terms
def test_l1_term_hand_value_before_disc_start(loss_fn, monkeypatch):
    monkeypatch.setattr(loss_fn, "pixel_weight", 2.5)
    monkeypatch.setattr(loss_fn, "perceptual_weight", 0.0)
    x = torch.zeros(1, 3, 4, 4)
    y = torch.zeros(1, 3, 4, 4)
    y[0, 0, 0, 0] = 0.8  # |err| sum = 0.8 + 0.4 * 2 = 1.6 over 48 values
    y[0, 1, 2, 3] = -0.4
    y[0, 2, 3, 3] = 0.4
    loss, log = loss_fn.generator_loss(x, y, None, step=0, last_layer=None)
    assert set(log) == LOG_KEYS
    assert loss.item() == pytest.approx(2.5 * 1.6, rel=1e-6)  # LDM: sum over pixels / batch (1)
    assert log["loss/l1"].item() == pytest.approx(1.6 / 48, rel=1e-6)
    assert log["loss/nll"].item() == pytest.approx(2.5 * 1.6, rel=1e-6)
    assert log["loss/lpips"].item() == 0.0
    for k in ("loss/g", "loss/d_weight", "loss/disc_factor", "loss/kl"):
        assert log[k].item() == 0.0


def _l1_and_known_term(loss_fn, monkeypatch, **known):
    """Loss = plain L1 + the fast start's known-pixel term (no LPIPS, no GAN), with `known` settings."""
    settings = {"pixel_weight": 1.0, "perceptual_weight": 0.0, "disc_start": 10**6, **known}
    for name, value in settings.items():
        monkeypatch.setattr(loss_fn, name, value)


def test_known_pixel_term_weights_only_known_pixels_and_anneals(loss_fn, monkeypatch):
    """The fast start's extra term: w(step) * sum(|x - y| * (1 - mask)) / batch, w linear to 0."""
    _l1_and_known_term(loss_fn, monkeypatch, known_pixel_weight=4.0, known_pixel_weight_steps=10)
    x = torch.zeros(2, 3, 4, 4)
    y = torch.zeros(2, 3, 4, 4)
    y[0, 0, 0, 0] = 0.8  # known pixel
    y[1, 2, 3, 3] = -0.4  # hole pixel: only in nll
    mask = torch.zeros(2, 1, 4, 4)
    mask[1, :, 3, 3] = 1.0
    nll = (0.8 + 0.4) / 2
    for step, w in ((0, 4.0), (5, 2.0), (10, 0.0), (20, 0.0)):
        loss, log = loss_fn.generator_loss(x, y, None, step=step, last_layer=None, mask=mask)
        assert loss.item() == pytest.approx(nll + w * 0.8 / 2, rel=1e-6), step
        assert log["loss/nll"].item() == pytest.approx(nll, rel=1e-6)  # the adaptive weight's input is unchanged
        assert log["loss/known_weight"].item() == pytest.approx(w)
    loss, _ = loss_fn.generator_loss(x, y, None, step=0, last_layer=None)  # no mask: no term
    assert loss.item() == pytest.approx(nll, rel=1e-6)
    monkeypatch.setattr(loss_fn, "known_pixel_weight_steps", 0)  # 0 = constant
    assert loss_fn.known_weight_at(10**6) == 4.0


def test_known_pixel_border_weight_scales_only_the_outer_ring_of_known_pixels(loss_fn, monkeypatch):
    """known_pixel_border_weight multiplies the extra term on the outermost pixel ring only."""
    _l1_and_known_term(loss_fn, monkeypatch, known_pixel_weight=2.0, known_pixel_weight_steps=0,
                       known_pixel_border_weight=5.0)
    x = torch.zeros(1, 3, 6, 6)
    y = torch.zeros(1, 3, 6, 6)
    y[0, 0, 0, 3] = 0.5  # known, on the border ring: weight 2 * 5
    y[0, 1, 1, 1] = 0.25  # known, one pixel inside: weight 2
    y[0, 2, 5, 5] = 0.125  # hole on the border: only in nll
    mask = torch.zeros(1, 1, 6, 6)
    mask[0, :, 5, 5] = 1.0
    nll = 0.5 + 0.25 + 0.125
    loss, log = loss_fn.generator_loss(x, y, None, step=0, last_layer=None, mask=mask)
    assert loss.item() == pytest.approx(nll + 2.0 * (5.0 * 0.5 + 0.25), rel=1e-6)
    assert log["loss/nll"].item() == pytest.approx(nll, rel=1e-6)


def test_known_pixel_near_hole_weight_scales_only_known_pixels_next_to_a_hole(loss_fn, monkeypatch):
    """known_pixel_near_hole_weight multiplies the extra term on known pixels with a hole among their
    8 neighbours (diagonals included), on top of the border weight; holes and farther pixels keep 1."""
    _l1_and_known_term(loss_fn, monkeypatch, known_pixel_weight=2.0, known_pixel_weight_steps=0,
                       known_pixel_border_weight=5.0, known_pixel_near_hole_weight=3.0)
    x = torch.zeros(1, 3, 8, 8)
    y = torch.zeros(1, 3, 8, 8)
    mask = torch.zeros(1, 1, 8, 8)
    mask[0, :, 3, 3] = 1.0
    mask[0, :, 7, 7] = 1.0
    y[0, 0, 2, 2] = 0.5  # known, diagonal neighbour of the hole at (3, 3): weight 2 * 3
    y[0, 1, 3, 4] = 0.25  # known, beside it: weight 2 * 3
    y[0, 2, 3, 5] = 0.125  # known, two pixels away: weight 2
    y[0, 0, 3, 3] = 1.0  # the hole: only in nll
    y[0, 1, 7, 6] = 0.0625  # known, on the border and next to the hole at (7, 7): weight 2 * 5 * 3
    nll = 0.5 + 0.25 + 0.125 + 1.0 + 0.0625
    loss, log = loss_fn.generator_loss(x, y, None, step=0, last_layer=None, mask=mask)
    assert loss.item() == pytest.approx(nll + 2.0 * (3 * 0.5 + 3 * 0.25 + 0.125 + 15 * 0.0625), rel=1e-6)
    assert log["loss/nll"].item() == pytest.approx(nll, rel=1e-6)


def test_hole_weight_adds_a_constant_l1_term_on_hole_pixels_only(loss_fn, monkeypatch):
    """hole_weight: + w * sum(|x - y| * mask) / batch at every step, outside nll; no mask, no term."""
    _l1_and_known_term(loss_fn, monkeypatch, known_pixel_weight=4.0, known_pixel_weight_steps=10, hole_weight=1.5)
    x = torch.zeros(2, 3, 4, 4)
    y = torch.zeros(2, 3, 4, 4)
    y[0, 0, 0, 0] = 0.8  # known pixel: nll and the (annealed) known-pixel term
    y[1, 2, 3, 3] = -0.4  # hole pixel: nll and the hole term
    mask = torch.zeros(2, 1, 4, 4)
    mask[1, :, 3, 3] = 1.0
    nll = (0.8 + 0.4) / 2
    for step, w in ((0, 4.0), (10, 0.0), (500, 0.0)):
        loss, log = loss_fn.generator_loss(x, y, None, step=step, last_layer=None, mask=mask)
        assert loss.item() == pytest.approx(nll + w * 0.8 / 2 + 1.5 * 0.4 / 2, rel=1e-6), step
        assert log["loss/nll"].item() == pytest.approx(nll, rel=1e-6)
    loss, _ = loss_fn.generator_loss(x, y, None, step=10, last_layer=None)
    assert loss.item() == pytest.approx(nll, rel=1e-6)


def test_known_pixel_weight_must_be_non_negative():
    from ldm_asym.losses import AsymLoss

    with pytest.raises(ValueError, match="known_pixel_weight"):
        AsymLoss(lpips_pretrained=False, perceptual_weight=0.0, known_pixel_weight=-1.0)
    with pytest.raises(ValueError, match="known_pixel_border_weight"):
        AsymLoss(lpips_pretrained=False, perceptual_weight=0.0, known_pixel_border_weight=-1.0)
    with pytest.raises(ValueError, match="known_pixel_near_hole_weight"):
        AsymLoss(lpips_pretrained=False, perceptual_weight=0.0, known_pixel_near_hole_weight=-1.0)
    with pytest.raises(ValueError, match="hole_weight"):
        AsymLoss(lpips_pretrained=False, perceptual_weight=0.0, hole_weight=-1.0)


def test_lpips_term_is_per_image_mean_and_weighted(loss_fn, monkeypatch):
    monkeypatch.setattr(loss_fn, "pixel_weight", 0.0)
    monkeypatch.setattr(loss_fn, "perceptual_weight", 0.7)
    x, y = images(1)
    with torch.no_grad():
        p = loss_fn.perceptual(x, y).flatten()
    assert p.shape == (2,) and (p > 0).all()
    loss, log = loss_fn.generator_loss(x, y, None, step=0, last_layer=None)
    per_image = x[0].numel()  # LPIPS is broadcast over every pixel, then summed (LDM)
    assert loss.item() == pytest.approx(0.7 * p.mean().item() * per_image, rel=1e-5)
    assert log["loss/lpips"].item() == pytest.approx(p.mean().item(), rel=1e-5)
    # Both terms together: nll = sum(pw * |x - y| + perc * lpips) / batch.
    monkeypatch.setattr(loss_fn, "pixel_weight", 1.0)
    loss, log = loss_fn.generator_loss(x, y, None, step=0, last_layer=None)
    expected = ((x - y).abs().mean() + 0.7 * p.mean()) * per_image
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_kl_term_uses_posterior_batch_mean(loss_fn, monkeypatch):
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    monkeypatch.setattr(loss_fn, "kl_weight", 0.25)
    g = torch.Generator().manual_seed(3)
    params = torch.randn(2, 8, 4, 4, generator=g)
    post = DiagonalGaussianDistribution(params)
    mu, logvar = params[:, :4], params[:, 4:].clamp(-30, 20)
    kl_hand = 0.5 * (mu**2 + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3)).mean()
    x, y = images(2)
    loss, log = loss_fn.generator_loss(x, y, post, step=0, last_layer=None)
    assert log["loss/kl"].item() == pytest.approx(kl_hand.item(), rel=1e-5)
    assert loss.item() == pytest.approx(log["loss/nll"].item() + 0.25 * kl_hand.item(), rel=1e-5)


# ---------------------------------------------------------------------- GAN schedule
def test_discriminator_not_called_before_disc_start(loss_fn):
    x, _ = images(3)
    conv = nn.Conv2d(3, 3, 3, padding=1)
    y = conv(x)
    calls, handle = count_calls(loss_fn.discriminator)
    try:
        assert not loss_fn.gan_active(9) and loss_fn.gan_active(10)
        loss, log = loss_fn.generator_loss(x, y, None, step=9, last_layer=conv.weight)
        assert calls == []
        assert log["loss/g"].item() == 0.0 and log["loss/disc_factor"].item() == 0.0
        assert loss.item() == pytest.approx(log["loss/nll"].item(), rel=1e-6)
        loss, log = loss_fn.generator_loss(x, y, None, step=10, last_layer=conv.weight)
        assert calls == [1]
        assert log["loss/disc_factor"].item() == 1.0
        assert log["loss/g"].item() != 0.0 and log["loss/d_weight"].item() > 0.0
        expected = log["loss/nll"] + log["loss/d_weight"] * log["loss/g"]
        assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    finally:
        handle.remove()


def test_disc_factor_zero_disables_gan(loss_fn, monkeypatch):
    monkeypatch.setattr(loss_fn, "disc_factor", 0.0)
    assert not loss_fn.gan_active(10**6)
    calls, handle = count_calls(loss_fn.discriminator)
    try:
        x, y = images(4)
        loss_fn.generator_loss(x, y, None, step=10**6, last_layer=None)
        assert calls == []
    finally:
        handle.remove()


def test_adaptive_weight_closed_form(loss_fn, monkeypatch, set_disc):
    # Decoder "last layer" = one scalar a: x_hat = a * z. With L1 only and D(r) = c * r:
    #   d nll / da = sum(-sign(x - a z) * z) / B,   d g / da = -c * mean(z).
    monkeypatch.setattr(loss_fn, "perceptual_weight", 0.0)
    monkeypatch.setattr(loss_fn, "disc_weight", 0.8)
    c = 5.0  # large enough that the ratio stays below the 1e4 clamp with LDM's sum reduction
    set_disc(LinearD(c))
    x, _ = images(5)
    z = torch.rand(x.shape, generator=torch.Generator().manual_seed(6))
    a = torch.tensor(0.7, requires_grad=True)
    y = a * z
    loss, log = loss_fn.generator_loss(x, y, None, step=10, last_layer=a)
    grad_nll = ((-torch.sign(x - 0.7 * z) * z).sum() / x.shape[0]).abs()
    grad_g = abs(c * z.mean())
    d_weight = (grad_nll / (grad_g + 1e-4)).item() * 0.8
    assert log["loss/d_weight"].item() == pytest.approx(d_weight, rel=1e-4)
    g = -(c * 0.7 * z).mean().item()
    assert log["loss/g"].item() == pytest.approx(g, rel=1e-5)
    assert loss.item() == pytest.approx(log["loss/nll"].item() + d_weight * g, rel=1e-4)
    # The weight is a constant (detached): the GAN gradient is d_weight * dg/da, nothing more.
    loss.backward()
    grad_expected = (-torch.sign(x - 0.7 * z) * z).sum() / x.shape[0] + d_weight * (-c * z.mean())
    assert a.grad.item() == pytest.approx(grad_expected.item(), rel=1e-4)


def test_adaptive_weight_matches_autograd_on_conv_decoder(loss_fn):
    torch.manual_seed(0)
    x, _ = images(7)
    conv = nn.Conv2d(3, 3, 3, padding=1)
    y = torch.tanh(conv(x))
    loss_fn.eval()  # BatchNorm D: same logits in both forward passes below
    try:
        loss, log = loss_fn.generator_loss(x, y, None, step=10, last_layer=conv.weight)
        nll = ((x - y).abs() + loss_fn.perceptual(x, y)).sum() / x.shape[0]
        g = -loss_fn.discriminator(y).mean()
        gn = torch.autograd.grad(nll, conv.weight, retain_graph=True)[0]
        gg = torch.autograd.grad(g, conv.weight, retain_graph=True)[0]
        expected = (gn.norm() / (gg.norm() + 1e-4)).clamp(0, 1e4) * 0.8
    finally:
        loss_fn.train()
    assert log["loss/d_weight"].item() == pytest.approx(expected.item(), rel=1e-4)
    assert log["loss/g"].item() == pytest.approx(g.item(), rel=1e-5)


def test_adaptive_weight_is_clamped(loss_fn, monkeypatch, set_disc):
    monkeypatch.setattr(loss_fn, "perceptual_weight", 0.0)
    monkeypatch.setattr(loss_fn, "pixel_weight", 100.0)  # |grad nll| >> 1 and |grad g| = 0
    set_disc(LinearD(0.0))
    x, _ = images(8)
    a = torch.tensor(-2.0, requires_grad=True)
    _, log = loss_fn.generator_loss(x, a * torch.ones_like(x), None, step=10, last_layer=a)
    assert log["loss/d_weight"].item() == pytest.approx(1e4 * 0.8, rel=1e-6)


def test_d_weight_zero_without_last_layer_or_grad(loss_fn):
    x, _ = images(9)
    conv = nn.Conv2d(3, 3, 3, padding=1)
    y = conv(x)
    loss, log = loss_fn.generator_loss(x, y, None, step=10, last_layer=None)
    assert log["loss/d_weight"].item() == 0.0 and log["loss/g"].item() != 0.0
    assert loss.item() == pytest.approx(log["loss/nll"].item(), rel=1e-6)
    with torch.no_grad():
        loss, log = loss_fn.generator_loss(x, conv(x), None, step=10, last_layer=conv.weight)
    assert log["loss/d_weight"].item() == 0.0 and log["loss/g"].item() != 0.0
    assert loss.item() == pytest.approx(log["loss/nll"].item(), rel=1e-6)


def test_losses_are_fp32_under_bf16_autocast(loss_fn):
    x, _ = images(10)
    conv = nn.Conv2d(3, 3, 3, padding=1)
    ref, ref_log = loss_fn.generator_loss(x, conv(x), None, step=0, last_layer=conv.weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x)
        assert y.dtype == torch.bfloat16
        loss, log = loss_fn.generator_loss(x, y, None, step=0, last_layer=conv.weight)
        _, log10 = loss_fn.generator_loss(x, y, None, step=10, last_layer=conv.weight)
    assert loss.dtype == torch.float32 and all(v.dtype == torch.float32 for v in log.values())
    assert log10["loss/d_weight"].dtype == torch.float32 and log10["loss/d_weight"].item() > 0
    # Only the bf16 rounding of y itself differs; LPIPS in bf16 would be off by ~1e-2.
    exact, _ = loss_fn.generator_loss(x, y.float(), None, step=0, last_layer=None)
    assert loss.item() == pytest.approx(exact.item(), rel=1e-5)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-2)


# ---------------------------------------------------------------------- discriminator step
@pytest.mark.parametrize("kind", ["hinge", "vanilla"])
def test_discriminator_loss_known_logits(loss_fn, monkeypatch, set_disc, kind):
    from taming.modules.losses.vqperceptual import hinge_d_loss, vanilla_d_loss

    monkeypatch.setattr(loss_fn, "_d_loss_fn", hinge_d_loss if kind == "hinge" else vanilla_d_loss)
    monkeypatch.setattr(loss_fn, "disc_factor", 2.0)
    real = torch.tensor([0.5, 2.0, -1.0, 0.0]).view(1, 1, 2, 2)
    fake = torch.tensor([-2.0, 0.5, 0.0, 3.0]).view(1, 1, 2, 2)
    set_disc(ConstD(real, fake))
    x, y = images(11)
    d_loss, log = loss_fn.discriminator_loss(x, y, step=10)
    if kind == "hinge":
        # relu(1 - real) = [0.5, 0, 2, 1] -> 0.875; relu(1 + fake) = [0, 1.5, 1, 4] -> 1.625
        expected = 2.0 * 0.5 * (0.875 + 1.625)
    else:
        sp = lambda v: math.log1p(math.exp(v))  # noqa: E731
        expected = 2.0 * 0.5 * (sum(sp(-v) for v in real.flatten().tolist()) / 4 + sum(sp(v) for v in fake.flatten().tolist()) / 4)
    assert d_loss.item() == pytest.approx(expected, rel=1e-6)
    assert log["disc/loss"].item() == pytest.approx(expected, rel=1e-6)
    assert log["disc/logits_real"].item() == pytest.approx(0.375)
    assert log["disc/logits_fake"].item() == pytest.approx(0.375)


def test_discriminator_loss_zero_before_start_and_detached(loss_fn):
    x, _ = images(12)
    conv = nn.Conv2d(3, 3, 3, padding=1)
    y = conv(x)
    d_loss, _ = loss_fn.discriminator_loss(x, y, step=9)
    assert d_loss.item() == 0.0
    d_loss.backward()  # still has a graph (through D), so a manual backward does not crash
    d_loss, log = loss_fn.discriminator_loss(x, y, step=10)
    assert d_loss.item() > 0.0
    loss_fn.discriminator.zero_grad()
    d_loss.backward()
    assert conv.weight.grad is None  # the reconstructions were detached
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in loss_fn.discriminator.parameters())
    loss_fn.discriminator.zero_grad()


# ---------------------------------------------------------------------- modules
def test_discriminator_param_count_and_lpips_separate(loss_fn):
    n = sum(p.numel() for p in loss_fn.discriminator.parameters())
    assert n == 2_765_633  # "2.77M" (taming NLayerDiscriminator, 3 layers, ndf 64, BatchNorm)
    assert any(isinstance(m, nn.BatchNorm2d) for m in loss_fn.discriminator.modules())
    lp = {id(p) for p in loss_fn.perceptual.parameters()}
    assert lp and lp.isdisjoint(id(p) for p in loss_fn.discriminator.parameters())


def test_actnorm_and_argument_validation():
    from taming.modules.util import ActNorm

    loss = AsymLoss(lpips_pretrained=False, lpips_net="alex", disc_norm="actnorm", disc_num_layers=2, disc_ndf=8)
    assert any(isinstance(m, ActNorm) for m in loss.discriminator.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in loss.discriminator.modules())
    with pytest.raises(ValueError, match="disc_loss"):
        AsymLoss(lpips_pretrained=False, lpips_net="alex", disc_loss="wgan")
    with pytest.raises(ValueError, match="disc_norm"):
        AsymLoss(lpips_pretrained=False, lpips_net="alex", disc_norm="group")


def test_lpips_frozen_and_stays_eval(loss_fn):
    import lpips

    assert isinstance(loss_fn.perceptual, lpips.LPIPS)
    assert all(not p.requires_grad for p in loss_fn.perceptual.parameters())
    loss_fn.train()
    assert loss_fn.training and loss_fn.discriminator.training
    assert not any(m.training for m in loss_fn.perceptual.modules())
    loss_fn.eval()
    assert not loss_fn.discriminator.training
    loss_fn.train(True)
    assert not any(m.training for m in loss_fn.perceptual.modules())
    assert all(p.requires_grad for p in loss_fn.discriminator.parameters())


# ---------------------------------------------------------------------- offline LPIPS weights
@pytest.fixture
def empty_torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)

    def no_download(*a, **k):
        raise AssertionError("attempted a download")

    import torchvision.models._api as tv_api

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    monkeypatch.setattr(tv_api, "load_state_dict_from_url", no_download, raising=False)
    return tmp_path / "hub" / "checkpoints"


def test_missing_vgg_trunk_fails_with_clear_message(empty_torch_home):
    with pytest.raises(FileNotFoundError) as e:
        check_lpips_weights("vgg")
    msg = str(e.value)
    assert "vgg16-397923af.pth" in msg and str(empty_torch_home) in msg
    assert "https://download.pytorch.org/models/vgg16-397923af.pth" in msg
    with pytest.raises(FileNotFoundError, match="vgg16-397923af.pth"):
        AsymLoss()  # fails at construction, before any download attempt
    with pytest.raises(FileNotFoundError, match="alexnet-owt-7be5be79.pth"):
        check_lpips_weights("alex")


def test_present_trunk_file_passes_and_empty_file_fails(empty_torch_home):
    empty_torch_home.mkdir(parents=True)
    f = empty_torch_home / "vgg16-397923af.pth"
    f.write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="empty"):
        check_lpips_weights("vgg")
    f.write_bytes(b"not really weights")
    assert check_lpips_weights("vgg") == str(f) == lpips_trunk_path("vgg")


def test_trunk_file_names_match_torchvision():
    from torchvision.models import AlexNet_Weights, SqueezeNet1_1_Weights, VGG16_Weights

    assert os.path.basename(VGG16_Weights.IMAGENET1K_V1.url) == LPIPS_TRUNK_FILES["vgg"]
    assert os.path.basename(AlexNet_Weights.IMAGENET1K_V1.url) == LPIPS_TRUNK_FILES["alex"]
    assert os.path.basename(SqueezeNet1_1_Weights.IMAGENET1K_V1.url) == LPIPS_TRUNK_FILES["squeeze"]


# ---------------------------------------------------------------------- it trains
def test_few_steps_reduce_the_loss(loss_fn):
    torch.manual_seed(0)
    x, _ = images(13, b=1, h=32, w=32)
    noisy = x + 0.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(14))
    dec = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.SiLU(), nn.Conv2d(16, 3, 3, padding=1))
    opt = torch.optim.Adam(dec.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss, _ = loss_fn.generator_loss(x, dec(noisy), None, step=0, last_layer=dec[-1].weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    # With the GAN on (alternating D steps) everything stays finite and the nll still goes down.
    opt_d = torch.optim.Adam(loss_fn.discriminator.parameters(), lr=1e-4)
    nlls = []
    for _ in range(3):
        y = dec(noisy)
        loss, log = loss_fn.generator_loss(x, y, None, step=10, last_layer=dec[-1].weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
        d_loss, dlog = loss_fn.discriminator_loss(x, y, step=10)
        opt_d.zero_grad()
        d_loss.backward()
        opt_d.step()
        nlls.append(log["loss/nll"].item())
        assert all(torch.isfinite(v) for v in {**log, **dlog}.values())
    assert nlls[-1] < nlls[0]
