"""Model core: parity with diffusers, parameter counts, blend semantics, input checks."""

import pytest
import torch
from conftest import TINY_VAE, make_asym, make_vae, masks, perturb_

from ldm_asym import AsymmetricAutoencoder, AsymmetricDecoder, load_autoencoder
from ldm_asym.interop import export_diffusers, from_diffusers

TOL = 1e-4  # max |diff| against diffusers, fp32 CPU


@pytest.mark.parametrize(
    "up_widths,resnets,blend,expected",
    [
        ((512, 512, 256, 128), 3, "none", 49_490_179),
        ((512, 512, 256, 128), 3, "add", 60_276_227),
        ((768, 768, 384, 192), 4, "add", 160_136_835),
        ((1024, 1024, 512, 256), 6, "add", 371_966_467),
    ],
)
def test_parameter_counts(up_widths, resnets, blend, expected):
    with torch.device("meta"):
        dec = AsymmetricDecoder(up_widths=up_widths, resnets_per_level=resnets, blend=blend)
    assert sum(p.numel() for p in dec.parameters()) == expected


def test_encoder_and_vanilla_decoder_match_sd_vae(tmp_path):
    ref = make_vae()
    ref.save_pretrained(tmp_path / "vae")
    ours = load_autoencoder(tmp_path / "vae").eval()
    assert ours.blend == "none" and ours.scaling_factor == pytest.approx(0.18215)
    x = torch.rand(2, 3, 64, 96) * 2 - 1
    with torch.no_grad():
        pr, po = ref.encode(x).latent_dist, ours.encode(x)
        assert (pr.mean - po.mean).abs().max() <= TOL and (pr.logvar - po.logvar).abs().max() <= TOL
        z = po.mode()
        assert (ref.decode(z).sample - ours.decode(z)).abs().max() <= TOL
        # the vanilla decoder ignores image/mask: it is exactly the SD decoder
        m = masks(2, 64, 96)["rect"]
        assert (ref.decode(z).sample - ours.decode(z, image=x, mask=m)).abs().max() <= TOL


@pytest.mark.parametrize("name,hw", [("tiny", (64, 64)), ("tiny", (64, 96)), ("x-1-5", (64, 64)), ("x-2", (64, 64))])
def test_decoder_parity_with_diffusers(tmp_path, name, hw):
    ref = make_asym(name)
    if name == "tiny":  # through a folder on disk; the large ones in memory (a 1.6 GB write is slow)
        ref.save_pretrained(tmp_path / name)
        ours = load_autoencoder(tmp_path / name).eval()
    else:
        ours = from_diffusers(ref).eval()
    assert ours.blend == "add"
    h, w = hw
    # One sample per mask kind (rectangle, half-plane, soft), decoded in one batch; plus no mask.
    m = torch.cat([v[:1] for v in masks(1, h, w).values()])
    x = torch.rand(3, 3, h, w) * 2 - 1
    z = torch.randn(3, 4, h // 8, w // 8)
    with torch.no_grad():
        plain = ref.decode(z).sample
        assert (plain - ours.decode(z)).abs().max() <= TOL
        a = ref.decode(z, image=x, mask=m).sample
        b = ours.decode(z, image=x, mask=m)
    assert (a - b).abs().amax(dim=(1, 2, 3)).max() <= TOL
    assert (a - plain).abs().amax(dim=(1, 2, 3)).min() > 1e-3  # each mask really acted


def test_roundtrip_export(tmp_path):
    from diffusers import AsymmetricAutoencoderKL, AutoencoderKL

    ref = make_asym("tiny")
    ref.save_pretrained(tmp_path / "src")
    ours = load_autoencoder(tmp_path / "src").eval()
    export_diffusers(ours, tmp_path / "out")
    back = AsymmetricAutoencoderKL.from_pretrained(tmp_path / "out").eval()
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    m = masks(1, 64, 64)["rect"]
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert (back.decode(z, image=x, mask=m).sample - ours.decode(z, image=x, mask=m)).abs().max() <= TOL
        assert (back.encode(x).latent_dist.mean - ours.encode(x).mean).abs().max() <= TOL
    # vanilla -> AutoencoderKL
    make_vae(TINY_VAE).save_pretrained(tmp_path / "v")
    vanilla = load_autoencoder(tmp_path / "v").eval()
    export_diffusers(vanilla, tmp_path / "vout")
    vback = AutoencoderKL.from_pretrained(tmp_path / "vout").eval()
    with torch.no_grad():
        assert (vback.decode(z).sample - vanilla.decode(z)).abs().max() <= TOL


def _tiny(blend="add", seed=0, perturb=True):
    torch.manual_seed(seed)
    m = AsymmetricAutoencoder(
        vae_config=dict(TINY_VAE),
        decoder=dict(up_widths=[64, 64, 64, 32], resnets_per_level=2, blend=blend, norm_num_groups=8),
    )
    return (perturb_(m) if perturb else m).eval()


def test_semantics_add():
    model = _tiny("add")
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    z = torch.randn(2, 4, 8, 8)
    rect = masks(2, 64, 64)["rect"]
    with torch.no_grad():
        plain = model.decode(z)
        # all-ones mask = no prior = unconditioned decode
        assert torch.equal(model.decode(z, image=x, mask=torch.ones_like(rect)), plain)
        # pixels under the hole never reach the output
        x2 = torch.where(rect.bool().expand_as(x), torch.rand_like(x), x)
        assert torch.equal(model.decode(z, image=x, mask=rect), model.decode(z, image=x2, mask=rect))
        # all-zero mask: the output depends only on the image, not on z
        zero = torch.zeros_like(rect)
        assert torch.equal(model.decode(z, image=x, mask=zero), model.decode(torch.randn_like(z), image=x, mask=zero))
        # but the known pixels do matter
        assert not torch.allclose(model.decode(z, image=x, mask=rect), model.decode(z, image=-x, mask=rect))


def test_concat_starts_equal_to_add():
    add, cat = _tiny("add"), _tiny("concat", perturb=False)  # concat as freshly built
    missing, unexpected = cat.load_state_dict(add.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("decoder.blend_convs.") for k in missing)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    z = torch.randn(2, 4, 8, 8)
    for m in masks(2, 64, 64).values():
        with torch.no_grad():
            assert (cat.decode(z, image=x, mask=m) - add.decode(z, image=x, mask=m)).abs().max() <= TOL
    assert sum(p.numel() for p in cat.decoder.blend_convs.parameters()) > 0


def test_branch_matched_by_level_not_shape():
    """Batch size only has to agree between z, image and mask (diffusers keys features by full shape)."""
    model = _tiny("add")
    x, m = torch.rand(3, 3, 64, 64) * 2 - 1, masks(3, 64, 64)["half"]
    z = torch.randn(3, 4, 8, 8)
    with torch.no_grad():
        full = model.decode(z, image=x, mask=m)
        one = model.decode(z[1:2], image=x[1:2], mask=m[1:2])
    assert (full[1:2] - one).abs().max() <= 1e-5


def test_frozen_parts_and_trainable_decoder():
    model = _tiny("add").train()
    assert all(not p.requires_grad for p in model.encoder.parameters())
    assert not model.quant_conv.weight.requires_grad and not model.post_quant_conv.weight.requires_grad
    assert all(p.requires_grad for p in model.decoder.parameters())
    assert not model.encoder.training and model.decoder.training


def test_gradient_checkpointing_same_grads():
    model = _tiny("add").train()
    x, m = torch.rand(1, 3, 64, 64) * 2 - 1, masks(1, 64, 64)["rect"]
    z = torch.randn(1, 4, 8, 8)

    def grads():
        model.zero_grad()
        model.decode(z, image=x, mask=m).square().mean().backward()
        return [p.grad.clone() for p in model.decoder.parameters()]

    g0 = grads()
    model.decoder.gradient_checkpointing = True
    g1 = grads()
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g0, g1))


def test_bf16_autocast_and_channels_last():
    model = _tiny("add")
    x, m = torch.rand(2, 3, 64, 64) * 2 - 1, masks(2, 64, 64)["soft"]
    z = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        ref = model.decode(z, image=x, mask=m)
        cl = model.to(memory_format=torch.channels_last).decode(
            z.to(memory_format=torch.channels_last), image=x.to(memory_format=torch.channels_last),
            mask=m.to(memory_format=torch.channels_last))
        assert (cl - ref).abs().max() <= TOL
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf = model.decode(z, image=x, mask=m)
    assert bf.dtype == torch.bfloat16 and torch.isfinite(bf).all()
    assert (bf.float() - ref).abs().mean() < 0.05 * ref.abs().mean() + 1e-3


@pytest.mark.parametrize(
    "case,match",
    [
        ("odd_size", "multiples of 8"),
        ("batch", "batch sizes differ"),
        ("size", "decodes to"),
        ("mask_range", r"\[0, 1\]"),
        ("mask_channels", "one channel"),
        ("nan_image", "NaN"),
        ("nan_z", "NaN"),
        ("mask_only", "together"),
    ],
)
def test_bad_inputs(case, match):
    model = _tiny("add")
    x, m, z = torch.rand(2, 3, 64, 64), torch.zeros(2, 1, 64, 64), torch.randn(2, 4, 8, 8)
    image = None
    if case == "odd_size":
        with pytest.raises(ValueError, match=match):
            model.encode(torch.rand(1, 3, 60, 64))
        return
    if case == "batch":
        m = m[:1]
    elif case == "size":
        x, m = x[..., :56, :], m[..., :56, :]
    elif case == "mask_range":
        m = m + 1.5
    elif case == "mask_channels":
        m = m.expand(2, 3, 64, 64)
    elif case == "nan_image":
        x[0, 0, 0, 0] = float("nan")
    elif case == "nan_z":
        z[0, 0, 0, 0] = float("nan")
    image = x
    if case == "mask_only":
        image = None
    with pytest.raises(ValueError, match=match):
        model.decode(z, image=image, mask=m)


def test_unknown_blend_lists_choices():
    with pytest.raises(ValueError, match="add, concat, none"):
        AsymmetricDecoder(blend="ad")
