"""Text-guided inpainting with a diffusers SD inpainting pipeline, decoded by its own VAE and by ours.

The diffusion runs **once** (`output_type="latent"`); the same latents are then decoded by the
pipeline's VAE ("vanilla") and by our `AsymmetricAutoencoderKL` ("asym") with the image and mask,
so the decoder is the only difference between the two results.

Why not simply set `pipe.vae = asym` and let the pipeline decode? diffusers 0.42.1 does call
`vae.decode(latents / scaling_factor, generator=..., image=init_image, mask=mask_condition)` for an
`AsymmetricAutoencoderKL` (pipeline_stable_diffusion_inpaint.py), but `init_image` / `mask_condition`
keep one row per prompt while the latents have `num_images_per_prompt` rows, and `MaskConditionDecoder`
looks its branch features up by full shape, batch included: `num_images_per_prompt > 1` raises
`KeyError: '(2, 64, 9, 11)'`. Two runs (one per VAE) would also double the diffusion cost and give
the same latents only if both encoders were identical. Here `image` / `mask` are built by the
pipeline's own `image_processor` / `mask_processor`, exactly as the pipeline builds them.

Masks (white = hole) are read with `ldm_asym.data.load_mask`: grey, RGB, RGBA (transparent = known)
and 16-bit files, soft values binarised at 0.5. The pipeline would do the same to a soft mask (its
`mask_processor` converts to grey, resizes with Lanczos, then sets `< 0.5 -> 0`, `>= 0.5 -> 1`; the
UNet's masked image is `image * (mask < 0.5)` and its mask channel a nearest resize of that binary
mask), so we hand it an already binary mask and everyone sees the same one.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps

from ldm_asym.data.datasets import _DECODE_ERRORS
from ldm_asym.data.masks import load_mask
from ldm_asym.interop import HUB_ID, load_autoencoder, to_diffusers
from ldm_asym.metrics import unmasked_error
from ldm_asym.util import atomic_write

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------- loading
def pick_device(device: str = "auto") -> torch.device:
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("mps" if torch.backends.mps.is_available() else "cpu")


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":  # fp16 halves memory on GPUs; CPUs have no fast fp16 kernels
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
            "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}[dtype]


def load_pipeline(source: str | os.PathLike, device: torch.device, dtype: torch.dtype):
    """A `StableDiffusionInpaintPipeline` from a local folder or a Hub id (from the HF cache offline)."""
    from diffusers import StableDiffusionInpaintPipeline

    path = Path(source)
    if path.is_dir() and not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"{path} is not a diffusers pipeline folder (no model_index.json)")
    if not path.exists() and not HUB_ID.match(str(source)):
        raise FileNotFoundError(f"pipeline {source!r} is neither a folder nor a Hugging Face Hub id (org/name)")
    try:
        pipe = StableDiffusionInpaintPipeline.from_pretrained(str(source), dtype=dtype)
    except Exception as e:
        if path.exists():
            raise
        raise FileNotFoundError(
            f"could not load pipeline {source!r} from the Hugging Face Hub ({type(e).__name__}: {e}). Offline? On a "
            f"machine with internet run `hf download {source} --exclude '*.ckpt' --local-dir DIR` (model_index.json "
            f"and the unet/, vae/, text_encoder/, tokenizer/, scheduler/ folders), copy DIR here and pass "
            f"--pipeline DIR."
        ) from e
    return pipe.to(device)


def load_asym_vae(ckpt, *, vae=None, use_ema: bool = False, trust_pickle: bool = False, device=None, dtype=None):
    """Any checkpoint `load_autoencoder` reads -> an in-memory diffusers `AsymmetricAutoencoderKL`."""
    from diffusers import AsymmetricAutoencoderKL

    out = to_diffusers(load_autoencoder(ckpt, vae=vae, use_ema=use_ema, trust_pickle=trust_pickle))
    if not isinstance(out, AsymmetricAutoencoderKL):
        raise ValueError(f"{ckpt} is a plain decoder (blend 'none', no conditional branch): nothing to compare")
    out = out.to(device).eval()
    # diffusers warns on every `.to(dtype)` of this class; cast only when it changes something
    return out if dtype in (None, out.dtype) else out.to(dtype)


def check_encoder(pipe_vae, asym) -> bool:
    """Our decoder was trained on latents of *its* frozen encoder: the pipeline's must be the same.

    Different latent channels: error (decoding would fail). Different weights or scaling: warning
    (the comparison then mixes two latent spaces). Returns True when the encoders are identical.
    """
    if pipe_vae.config.latent_channels != asym.config.latent_channels:
        raise ValueError(f"the pipeline's VAE has {pipe_vae.config.latent_channels} latent channels, our checkpoint "
                         f"{asym.config.latent_channels}: this decoder belongs to another VAE family")
    if pipe_vae.config.scaling_factor != asym.config.scaling_factor:
        log.warning("latent scaling differs: pipeline %s, checkpoint %s (decoding uses the pipeline's)",
                    pipe_vae.config.scaling_factor, asym.config.scaling_factor)
    theirs = pipe_vae.state_dict()
    ours = {k: v for k, v in asym.state_dict().items() if k.startswith(("encoder.", "quant_conv."))}
    differ = [k for k, v in ours.items()
              if k not in theirs or theirs[k].shape != v.shape or not torch.equal(theirs[k].to(v), v)]
    if differ:
        log.warning("the pipeline's VAE encoder differs from our checkpoint's frozen encoder (%d of %d tensors, "
                    "e.g. %s): the latents are not the ones our decoder was trained on, so the comparison is "
                    "not meaningful. Use the pipeline whose VAE the decoder was trained with.",
                    len(differ), len(ours), differ[0])
    return not differ


# ---------------------------------------------------------------------- sizes
@dataclass
class Prepared:
    image: Image.Image  # RGB, both sides multiples of the pipeline's `vae_scale_factor`
    mask: Image.Image  # "L", 0 / 255 (white = hole), same size
    original: Image.Image  # the RGB input as read
    original_mask: Image.Image  # the binary mask at the original size
    fit: str

    def restore(self, im: Image.Image) -> Image.Image:
        """A result at the working size -> the original size (crop the padding, or resize back)."""
        if self.fit == "pad":
            return im.crop((0, 0, *self.original.size))
        return im.resize(self.original.size, Image.LANCZOS)


def read_image(path, arg: str = "--image") -> Image.Image:
    """The RGB image at `path`, upright as viewers show it (EXIF), fully decoded.

    Empty, truncated, non-image and decompression-bomb files (over Pillow's MAX_IMAGE_PIXELS,
    even those Pillow only warns about) raise ValueError naming `arg` and the file.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()
                return ImageOps.exif_transpose(im).convert("RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"{arg} {path}: file not found") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ValueError(f"{arg} {path}: refused as a possible decompression bomb ({e})") from e
    except _DECODE_ERRORS as e:
        raise ValueError(f"{arg} {path}: cannot read it as an image ({type(e).__name__}: {e})") from e


def read_mask(path, size: tuple[int, int] | None = None, arg: str = "--mask") -> torch.Tensor:
    """`load_mask` with errors that name `arg`."""
    try:
        return load_mask(path, size=size)
    except FileNotFoundError:
        raise FileNotFoundError(f"{arg} {path}: file not found") from None
    except ValueError as e:
        raise ValueError(f"{arg}: {e}") from e


def prepare(image_path, mask_path, multiple: int = 8, fit: str = "pad") -> Prepared:
    """Read image and mask and bring them to sides that are multiples of `multiple`.

    The pipeline refuses other sizes (`check_inputs`: height and width divisible by its
    vae_scale_factor); its UNet copes with any latent size. fit="pad" mirrors up to multiple-1
    pixels at the right/bottom and crops them off afterwards, so known pixels are never
    resampled (the point of this decoder); fit="resize" rescales to the nearest multiple and back.
    """
    image = read_image(image_path)  # as viewers (and mask editors) show it
    w, h = image.size
    if min(w, h) < multiple:
        raise ValueError(f"--image {image_path} is {w}x{h}; both sides must be at least {multiple} px")
    mask = read_mask(mask_path)[0]
    if tuple(mask.shape) != (h, w):
        log.warning("mask %s is %dx%d, image is %dx%d: resizing the mask (nearest)", mask_path,
                    mask.shape[1], mask.shape[0], w, h)
        mask = read_mask(mask_path, size=(h, w))[0]
    mask = original_mask = Image.fromarray((mask.numpy() * 255).astype(np.uint8), "L")
    original = image
    if fit == "pad":
        pad = ((0, -h % multiple), (0, -w % multiple))
        image = Image.fromarray(np.pad(np.asarray(image), pad + ((0, 0),), mode="symmetric"))
        mask = Image.fromarray(np.pad(np.asarray(mask), pad, mode="symmetric"))
    elif fit == "resize":
        size = tuple(max(multiple, round(s / multiple) * multiple) for s in (w, h))
        image = image.resize(size, Image.LANCZOS)
        mask = mask.resize(size, Image.NEAREST)  # stays binary
    else:
        raise ValueError(f"fit must be 'pad' or 'resize'; got {fit!r}")
    return Prepared(image, mask, original, original_mask, fit)


# ---------------------------------------------------------------------- inpainting
@torch.inference_mode()
def inpaint(pipe, asym, prep: Prepared, prompt: str, *, negative_prompt: str | None = None, seed: int = 0,
            steps: int = 50, guidance_scale: float = 7.5, num_images: int = 1) -> dict[str, list[Image.Image]]:
    """One diffusion run, two decodes -> {"vanilla": [...], "asym": [...]} PIL images at the original size."""
    width, height = prep.image.size
    device = pipe._execution_device
    # A CPU generator gives the same noise on every device.
    generator = torch.Generator("cpu").manual_seed(seed)
    latents = pipe(prompt, image=prep.image, mask_image=prep.mask, height=height, width=width,
                   negative_prompt=negative_prompt, num_inference_steps=steps, guidance_scale=guidance_scale,
                   num_images_per_prompt=num_images, generator=generator, output_type="latent").images
    z = latents / pipe.vae.config.scaling_factor
    # Exactly what the pipeline hands an AsymmetricAutoencoderKL (1 = hole, binary, B x 1 x H x W),
    # repeated to the latents' batch (which the pipeline forgets to do).
    image = pipe.image_processor.preprocess(prep.image, height=height, width=width)
    mask = pipe.mask_processor.preprocess(prep.mask, height=height, width=width)
    image, mask = (t.to(device, z.dtype).repeat(len(z), 1, 1, 1) for t in (image, mask))
    out = {}
    for name, vae, cond in (("vanilla", pipe.vae, {}), ("asym", asym, {"image": image, "mask": mask})):
        x = vae.decode(z.to(vae.dtype), **cond).sample  # image=/mask= by keyword: `generator` is 2nd
        x, nsfw = pipe.run_safety_checker(x, device, latents.dtype)
        if nsfw is not None and any(nsfw):
            log.warning("%s: the safety checker blacked out %d image(s)", name, sum(nsfw))
        pil = pipe.image_processor.postprocess(x, output_type="pil",
                                               do_denormalize=None if nsfw is None else [not n for n in nsfw])
        out[name] = [prep.restore(p) for p in pil]
    return out


def known_pixel_error(original: Image.Image, result: Image.Image, mask: Image.Image) -> float:
    """The paper's unmasked error (MSE on known pixels, [0, 1] scale) in units of 1e-5."""
    t = lambda im: torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1)[None] / 127.5 - 1  # noqa: E731
    m = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255)[None, None]
    return float(unmasked_error(t(original), t(result), m)[0]) * 1e5


def comparison(prep: Prepared, results: dict[str, list[Image.Image]]) -> Image.Image:
    """One row per sample: input | input with the hole greyed | vanilla | asym."""
    image, mask = prep.original, prep.original_mask
    holed = Image.composite(Image.new("RGB", image.size, (128, 128, 128)), image, mask)
    rows = [[image, holed, v, a] for v, a in zip(results["vanilla"], results["asym"])]
    w, h = image.size
    grid = Image.new("RGB", (4 * w, len(rows) * h), "white")
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            grid.paste(im, (c * w, r * h))
    draw = ImageDraw.Draw(grid)
    for c, label in enumerate(("input", "mask", "vanilla", "asym")):
        draw.text((c * w + 3, 2), label, fill="white", stroke_width=1, stroke_fill="black")
    return grid


def save_results(out_dir, name: str, prep: Prepared, results: dict[str, list[Image.Image]]) -> list[Path]:
    """OUT/NAME_{vanilla,asym}_{k}.png and OUT/NAME_compare.png, each written atomically; logs the
    known-pixel error of each."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for kind, images in results.items():
        for k, im in enumerate(images):
            paths.append(out_dir / f"{name}_{kind}_{k}.png")
            with atomic_write(paths[-1], "wb") as f:
                im.save(f, format="PNG")
            err = known_pixel_error(prep.original, im, prep.original_mask)
            log.info("%s: known-pixel MSE %.1fe-5", paths[-1].name, err)
    paths.append(out_dir / f"{name}_compare.png")
    with atomic_write(paths[-1], "wb") as f:
        comparison(prep, results).save(f, format="PNG")
    return paths
