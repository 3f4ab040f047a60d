"""Training loss for the asymmetric decoder: latent-diffusion's `LPIPSWithDiscriminator`, adapted.

The generator objective is LDM's (L1 + LPIPS reconstruction, KL, hinge/vanilla PatchGAN with the
VQGAN adaptive weight), with three deliberate differences:

* there is no learned ``logvar`` (LDM's is 0 and stays 0 when, as here, it is not optimised).
  Reductions are LDM's: ``nll = sum(rec) / batch`` and ``kl = sum(kl) / batch``, so the adaptive
  weight and its 1e4 clamp act exactly as in the authors' runs.
* before ``disc_start`` the discriminator is not run at all in the generator step (LDM runs it and
  multiplies the result by 0).
* the generator step and the discriminator step are separate methods (Lightning 2.x manual
  optimisation) instead of one ``forward(..., optimizer_idx)``.

LPIPS comes from the ``lpips`` package (not taming's copy, which downloads to a cwd-relative
path); its trunk comes from torchvision's cache, see `check_lpips_weights`.
"""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

# torchvision's ImageNet trunks that `lpips` loads through `torchvision.models.<net>(pretrained=True)`.
LPIPS_TRUNK_FILES = {
    "vgg": "vgg16-397923af.pth",
    "vgg16": "vgg16-397923af.pth",
    "alex": "alexnet-owt-7be5be79.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}
TORCHVISION_MODEL_URL = "https://download.pytorch.org/models/"


def lpips_trunk_path(net: str = "vgg") -> str:
    """Where torchvision looks for (and would download) the ImageNet trunk of LPIPS' `net`."""
    if net not in LPIPS_TRUNK_FILES:
        raise ValueError(f"unknown LPIPS net {net!r}; expected one of {sorted(LPIPS_TRUNK_FILES)}")
    return os.path.join(torch.hub.get_dir(), "checkpoints", LPIPS_TRUNK_FILES[net])


def check_lpips_weights(net: str = "vgg") -> str:
    """Fail early, with a useful message, if LPIPS' pretrained trunk is not in the torch hub cache.

    `lpips.LPIPS(pnet_rand=False)` builds ``torchvision.models.vgg16(pretrained=True)`` (or alexnet
    / squeezenet), which downloads the ImageNet weights into ``torch.hub.get_dir()/checkpoints``
    (``$TORCH_HOME/hub/checkpoints``; default ``~/.cache/torch/hub/checkpoints``). On a machine
    without network access that download fails deep inside a training run; this function only
    checks that the file is there (it never downloads) and raises `FileNotFoundError` naming the
    file, the folder and the URL otherwise. A 0-byte file (an interrupted download) counts as
    missing. The linear LPIPS heads ship inside the ``lpips`` package and are checked too.

    Returns the path of the trunk file.
    """
    path = lpips_trunk_path(net)
    name = os.path.basename(path)
    folder = os.path.dirname(path)
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        state = "is empty (0 bytes; an interrupted download?)" if os.path.isfile(path) else "is missing"
        raise FileNotFoundError(
            f"LPIPS ({net}) needs torchvision's ImageNet weights {name}, which {state} from the torch hub "
            f"cache folder {folder} (torch.hub.get_dir()/checkpoints; set TORCH_HOME to move it). "
            f"Nothing is downloaded automatically. On a machine with internet access get it from "
            f"{TORCHVISION_MODEL_URL}{name} (e.g. `wget -P {folder} {TORCHVISION_MODEL_URL}{name}`) "
            f"and copy it to {path}. For tests only, build the loss with lpips_pretrained=False "
            f"(random trunk)."
        )
    import lpips

    head = os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", f"{'vgg' if net == 'vgg16' else net}.pth")
    if not os.path.isfile(head):
        raise FileNotFoundError(f"the lpips package has no linear-head weights {head}; reinstall lpips")
    return path


def build_lpips(net: str = "vgg", pretrained: bool = True, spatial: bool = False) -> nn.Module:
    """A frozen, eval-mode `lpips.LPIPS`; `pretrained=False` gives a random trunk (tests, offline).

    The linear heads (shipped with the package) are always the calibrated ones. With
    ``pretrained=True`` the trunk file is checked first (`check_lpips_weights`) so that a missing
    file fails with a clear message instead of a download attempt.
    """
    import lpips

    if pretrained:
        check_lpips_weights(net)
    with warnings.catch_warnings():
        # torchvision's deprecation notices about lpips' `pretrained=` call.
        warnings.filterwarnings("ignore", message=".*(pretrained|weight enum).*", category=UserWarning)
        model = lpips.LPIPS(pretrained=True, net=net, pnet_rand=not pretrained, spatial=spatial, verbose=False)
    model.eval()
    model.requires_grad_(False)
    return model


@contextmanager
def _fp32(device: torch.device):
    """Disable autocast for `device`'s type (bf16/fp16 autocast -> plain fp32 maths)."""
    with torch.autocast(device_type=device.type, enabled=False):
        yield


def _drop_perceptual(module, state_dict, prefix, local_metadata):
    for key in [k for k in state_dict if k.startswith(prefix + "perceptual.")]:
        del state_dict[key]


def border_weights(size: tuple[int, int], weight: float, device=None) -> torch.Tensor:
    """H×W map: `weight` on the outermost pixel ring, 1 inside."""
    w = torch.full(tuple(size), float(weight), device=device)
    w[1:-1, 1:-1] = 1.0
    return w


def near_hole_weights(mask: torch.Tensor, weight: float) -> torch.Tensor:
    """B×1×H×W map: `weight` on known pixels with a hole among their 8 neighbours, 1 elsewhere."""
    band = F.max_pool2d(mask, kernel_size=3, stride=1, padding=1) * (1 - mask)
    return 1 + (weight - 1) * band


class AsymLoss(nn.Module):
    """L1 + LPIPS + KL + PatchGAN loss for training the asymmetric decoder (paper defaults).

    Args:
        disc_start: first global step at which the GAN term (and the discriminator step) is on.
        pixel_weight: weight of the per-pixel L1 term.
        perceptual_weight: weight of LPIPS (per image, broadcast over pixels as in LDM); 0 skips it.
        lpips_net: "vgg" (paper / LDM) or "alex".
        lpips_pretrained: False builds LPIPS with a random trunk (``pnet_rand=True``): tests only.
        kl_weight: weight of ``posterior.kl()`` (mean over the batch). With a frozen encoder it
            carries no gradient; kept so the logged total matches the LDM recipe.
        disc_num_layers, disc_in_channels, disc_ndf: taming's `NLayerDiscriminator` shape.
        disc_factor: multiplier of the GAN terms once active (0 disables the GAN entirely).
        disc_weight: multiplier of the adaptive weight (paper: 0.8).
        disc_loss: "hinge" or "vanilla" (discriminator objective; the generator uses ``-mean(D)``).
        disc_norm: "batch" (BatchNorm, taming's default) or "actnorm".
        use_actnorm: LDM-config alias for ``disc_norm="actnorm"``.
        known_pixel_weight, known_pixel_weight_steps: an extra L1 term on the known pixels only
            (``mask == 0``), weighted `known_pixel_weight` at step 0 and annealed linearly to 0 at
            `known_pixel_weight_steps` (0 = never annealed). Same reduction as the L1 in ``nll``. Not
            in the paper (default 0): the fast start of configs/ablations/fast_start.yaml, see
            docs/convergence.md. It is added outside ``nll``, so the GAN's adaptive weight is the
            paper's.
        known_pixel_border_weight: multiplier of that term on the image's outermost pixel ring (1 =
            uniform). The output conv zero-pads, so a known pixel on the border sees zeros where the
            interior sees features: that ring is the slowest part of the pass-through to learn
            (docs/convergence.md measures it).
        known_pixel_near_hole_weight: multiplier of that term on known pixels with a hole among
            their 8 neighbours (1 = uniform). The output conv is 3×3, so there it mixes the branch's
            features with the decoder's hole features: the same cause as the border ring.
        hole_weight: an extra L1 term on the hole pixels (``mask == 1``; all pixels of an all-ones
            mask), ``hole_weight * sum(|x - x̂| * mask) / batch``, constant, added outside ``nll`` like
            the known-pixel term. Not in the paper (default 0): at demo scale it lifted the hole PSNR
            by 0.4-0.8 dB while the unmasked-error cut moved by no more than the seed moves it
            (docs/convergence.md, "The hole weight"). Once the known
            pixels pass through, the whole-image L1 still spends most of its (sign) gradient on them;
            this gives the holes, which only the decoder's own path can fix, a larger share.
    """

    def __init__(
        self,
        disc_start: int = 50001,
        pixel_weight: float = 1.0,
        perceptual_weight: float = 1.0,
        lpips_net: str = "vgg",
        lpips_pretrained: bool = True,
        kl_weight: float = 1e-6,
        disc_num_layers: int = 3,
        disc_in_channels: int = 3,
        disc_ndf: int = 64,
        disc_factor: float = 1.0,
        disc_weight: float = 0.8,
        disc_loss: str = "hinge",
        disc_norm: str = "batch",
        use_actnorm: bool = False,
        known_pixel_weight: float = 0.0,
        known_pixel_weight_steps: int = 0,
        known_pixel_border_weight: float = 1.0,
        known_pixel_near_hole_weight: float = 1.0,
        hole_weight: float = 0.0,
    ):
        super().__init__()
        from taming.modules.discriminator.model import NLayerDiscriminator, weights_init
        from taming.modules.losses.vqperceptual import hinge_d_loss, vanilla_d_loss

        if disc_loss not in ("hinge", "vanilla"):
            raise ValueError(f"disc_loss must be 'hinge' or 'vanilla'; got {disc_loss!r}")
        if disc_norm not in ("batch", "actnorm"):
            raise ValueError(f"disc_norm must be 'batch' or 'actnorm'; got {disc_norm!r}")
        self.disc_start = int(disc_start)
        self.pixel_weight = float(pixel_weight)
        self.perceptual_weight = float(perceptual_weight)
        self.kl_weight = float(kl_weight)
        self.disc_factor = float(disc_factor)
        self.disc_weight = float(disc_weight)
        self.disc_loss_name = disc_loss
        if known_pixel_weight < 0 or known_pixel_weight_steps < 0:
            raise ValueError(f"known_pixel_weight and known_pixel_weight_steps must be >= 0; got "
                             f"{known_pixel_weight} and {known_pixel_weight_steps}")
        self.known_pixel_weight = float(known_pixel_weight)
        self.known_pixel_weight_steps = int(known_pixel_weight_steps)
        if known_pixel_border_weight < 0:
            raise ValueError(f"known_pixel_border_weight must be >= 0; got {known_pixel_border_weight}")
        self.known_pixel_border_weight = float(known_pixel_border_weight)
        if known_pixel_near_hole_weight < 0:
            raise ValueError(f"known_pixel_near_hole_weight must be >= 0; got {known_pixel_near_hole_weight}")
        self.known_pixel_near_hole_weight = float(known_pixel_near_hole_weight)
        if hole_weight < 0:
            raise ValueError(f"hole_weight must be >= 0; got {hole_weight}")
        self.hole_weight = float(hole_weight)
        self._d_loss_fn = hinge_d_loss if disc_loss == "hinge" else vanilla_d_loss

        self.perceptual = build_lpips(lpips_net, pretrained=lpips_pretrained)
        self.discriminator = NLayerDiscriminator(
            input_nc=disc_in_channels,
            ndf=disc_ndf,
            n_layers=disc_num_layers,
            use_actnorm=use_actnorm or disc_norm == "actnorm",
        ).apply(weights_init)
        # LPIPS is a fixed, published network: keep its 14.7M weights out of every checkpoint
        # (they come from the lpips package and torchvision's cache) and accept checkpoints
        # with or without them.
        self._register_state_dict_hook(_drop_perceptual)
        self._register_load_state_dict_pre_hook(self._fill_perceptual)

    def _fill_perceptual(self, state_dict, prefix, *args) -> None:
        for key, value in self.perceptual.state_dict().items():
            state_dict.setdefault(f"{prefix}perceptual.{key}", value)

    # ------------------------------------------------------------------ mode handling
    def train(self, mode: bool = True) -> "AsymLoss":
        """Usual `train()`, except that LPIPS always stays in eval mode (its dropout off)."""
        super().train(mode)
        self.perceptual.eval()
        return self

    # ------------------------------------------------------------------ schedule
    def disc_factor_at(self, step: int) -> float:
        """`adopt_weight(disc_factor, step, threshold=disc_start)`: 0 before `disc_start`."""
        from taming.modules.losses.vqperceptual import adopt_weight

        return float(adopt_weight(self.disc_factor, step, threshold=self.disc_start))

    def known_weight_at(self, step: int) -> float:
        """Weight of the extra known-pixel L1 at `step`: linear from `known_pixel_weight` to 0."""
        if self.known_pixel_weight_steps <= 0:
            return self.known_pixel_weight
        return self.known_pixel_weight * max(0.0, 1.0 - step / self.known_pixel_weight_steps)

    def gan_active(self, step: int) -> bool:
        """Whether the GAN terms count at `step` (``step >= disc_start`` and ``disc_factor > 0``).

        The training loop can skip the discriminator step when this is False.
        """
        return self.disc_factor_at(step) > 0.0

    # ------------------------------------------------------------------ pieces
    def _to_disc(self, images: torch.Tensor) -> torch.Tensor:
        """Images in the discriminator's parameter dtype (a bf16 decoder output into an fp32 D)."""
        param = next(iter(self.discriminator.parameters()), None)
        return (images if param is None else images.to(param.dtype)).contiguous()

    def perceptual_loss(self, inputs: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
        """LPIPS per image, shape (B, 1, 1, 1), in fp32 (inputs in [-1, 1])."""
        with _fp32(inputs.device):
            return self.perceptual(inputs.float().contiguous(), reconstructions.float().contiguous())

    def calculate_adaptive_weight(
        self, nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor
    ) -> torch.Tensor:
        """``clamp(|grad nll| / (|grad g| + 1e-4), 0, 1e4) * disc_weight``, detached, fp32.

        Gradients are taken w.r.t. `last_layer` (the decoder's output conv weight) with
        ``retain_graph=True`` so the caller can still back-propagate the total loss.
        """
        nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
        g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
        d_weight = torch.linalg.vector_norm(nll_grads.float()) / (torch.linalg.vector_norm(g_grads.float()) + 1e-4)
        d_weight = torch.clamp(d_weight, 0.0, 1e4).detach()
        return d_weight * self.disc_weight

    # ------------------------------------------------------------------ generator step
    def generator_loss(
        self,
        inputs: torch.Tensor,
        reconstructions: torch.Tensor,
        posterior=None,
        step: int = 0,
        last_layer: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The decoder's loss: ``nll + kl_weight * KL + d_weight * disc_factor * g`` (+ the known-pixel
        term ``known_weight_at(step) * sum(|x - x̂| * (1 - mask) * b) / batch``, ``b`` =
        `known_pixel_border_weight` on the outermost pixel ring and 1 inside, times
        `known_pixel_near_hole_weight` on known pixels next to a hole, when that weight is > 0 and
        `mask`, 1 = hole, is given; + ``hole_weight * sum(|x - x̂| * mask) / batch`` likewise).

        ``nll = sum(pixel_weight * |x - x̂| + perceptual_weight * LPIPS(x, x̂)) / batch`` (LPIPS per
        image, broadcast over pixels, as LDM). Everything is computed in fp32, also under bf16/fp16 autocast (the
        discriminator itself runs under the ambient autocast; its logits are cast to fp32).

        The GAN term is only computed when `gan_active(step)`: before `disc_start` the
        discriminator is not called and the two `autograd.grad` calls are skipped. Once active,
        ``d_weight`` is the adaptive weight w.r.t. `last_layer`; when `last_layer` is None or grad
        mode is off (validation, `torch.no_grad` / `inference_mode`) ``d_weight = 0``: the g term is
        logged but does not enter the total, as in LDM, whose validation hits the same case (its
        `autograd.grad` raises and it falls back to 0). Validation totals are therefore comparable
        to each other but not to training totals after `disc_start`.

        Returns ``(loss, log)``; `log` holds detached fp32 scalars ``loss/total``, ``loss/nll``,
        ``loss/l1`` (unweighted L1 mean), ``loss/lpips`` (unweighted LPIPS mean), ``loss/kl``
        (batch mean, unweighted), ``loss/g`` (0 while the GAN is off), ``loss/d_weight`` and
        ``loss/disc_factor``.
        """
        device = inputs.device
        x = inputs.float().contiguous()
        xr = reconstructions.float().contiguous()
        with _fp32(device):
            l1 = (x - xr).abs()
            rec = self.pixel_weight * l1
            if self.perceptual_weight > 0:
                p_loss = self.perceptual_loss(x, xr)
                rec = rec + self.perceptual_weight * p_loss
            else:
                p_loss = torch.zeros((), device=device)
            nll = rec.sum() / rec.shape[0]  # LDM: sum over pixels, mean over the batch

            if posterior is not None:
                kl = posterior.kl().float().mean().to(device)
            else:
                kl = torch.zeros((), device=device)

        zero = torch.zeros((), device=device)
        disc_factor = self.disc_factor_at(step)
        g_loss, d_weight = zero, zero
        loss = nll + self.kl_weight * kl
        known_w = self.known_weight_at(step) if mask is not None else 0.0
        if known_w > 0:
            with _fp32(device):
                m = mask.float()
                known = 1 - m
                if self.known_pixel_border_weight != 1:
                    known = known * border_weights(known.shape[-2:], self.known_pixel_border_weight, device)
                if self.known_pixel_near_hole_weight != 1:
                    known = known * near_hole_weights(m, self.known_pixel_near_hole_weight)
                known_l1 = (l1 * known).sum() / l1.shape[0]
            loss = loss + known_w * known_l1
        if self.hole_weight > 0 and mask is not None:
            with _fp32(device):
                hole_l1 = (l1 * mask.float()).sum() / l1.shape[0]
            loss = loss + self.hole_weight * hole_l1
        if disc_factor > 0:
            logits_fake = self.discriminator(self._to_disc(reconstructions))
            with _fp32(device):
                g_loss = -logits_fake.float().mean()
                if last_layer is not None and torch.is_grad_enabled():
                    d_weight = self.calculate_adaptive_weight(nll, g_loss, last_layer)
                loss = loss + d_weight * disc_factor * g_loss

        log = {
            "loss/total": loss.detach(),
            "loss/nll": nll.detach(),
            "loss/l1": l1.detach().mean(),
            "loss/lpips": p_loss.detach().mean(),
            "loss/kl": kl.detach(),
            "loss/g": g_loss.detach(),
            "loss/d_weight": d_weight.detach(),
            "loss/disc_factor": torch.tensor(disc_factor, device=device),
        }
        if self.known_pixel_weight > 0:
            log["loss/known_weight"] = torch.tensor(known_w, device=device)
        return loss, log

    # ------------------------------------------------------------------ discriminator step
    def discriminator_loss(
        self, inputs: torch.Tensor, reconstructions: torch.Tensor, step: int = 0
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``disc_factor(step) * d_loss(D(x), D(x̂))`` on detached images (hinge or vanilla).

        Before `disc_start` the value is 0, but D still runs (as in LDM) so the loss has a graph
        and `backward()` works; skip the step altogether with `gan_active` to save the compute.
        Logs ``disc/loss``, ``disc/logits_real`` and ``disc/logits_fake`` (means, detached, fp32).
        """
        logits_real = self.discriminator(self._to_disc(inputs.detach()))
        logits_fake = self.discriminator(self._to_disc(reconstructions.detach()))
        with _fp32(inputs.device):
            logits_real, logits_fake = logits_real.float(), logits_fake.float()
            d_loss = self.disc_factor_at(step) * self._d_loss_fn(logits_real, logits_fake)
        log = {
            "disc/loss": d_loss.detach(),
            "disc/logits_real": logits_real.detach().mean(),
            "disc/logits_fake": logits_fake.detach().mean(),
        }
        return d_loss, log


__all__ = ["AsymLoss", "LPIPS_TRUNK_FILES", "build_lpips", "check_lpips_weights", "lpips_trunk_path"]
