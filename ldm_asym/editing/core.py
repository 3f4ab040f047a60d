"""Loading the pipeline and our decoder, and one edit: one diffusion run, two decodes of its latents."""

from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path

import torch
from PIL import Image

from ldm_asym.editing import pipelines
from ldm_asym.editing.pipelines import Family
from ldm_asym.interop import load_autoencoder, missing_source_message

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------- devices
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


# ---------------------------------------------------------------------- loading
def pipeline_folder(source: str | os.PathLike) -> Path:
    """A local pipeline folder (with model_index.json) for `source`: the folder itself, or a Hub id's
    snapshot (from the HF cache offline; otherwise an error that says what to download)."""
    path = Path(source)
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(f"{path} is not a diffusers pipeline folder (no model_index.json)")
        return path
    why = missing_source_message(str(source))
    if why:
        raise FileNotFoundError(f"--pipeline: {why}")
    from diffusers import DiffusionPipeline

    try:
        return Path(DiffusionPipeline.download(str(source)))
    except Exception as e:
        raise FileNotFoundError(
            f"could not load pipeline {source!r} from the Hugging Face Hub ({type(e).__name__}: {e}). Offline? On a "
            f"machine with internet run `hf download {source} --exclude '*.ckpt' --local-dir DIR` (model_index.json "
            f"and the component folders it names: unet/ or transformer/, vae/, text encoders, tokenizers, "
            f"scheduler/ ...), copy DIR here and pass --pipeline DIR."
        ) from e


def _model_index(folder: Path) -> dict:
    index = folder / "model_index.json"
    try:
        out = json.loads(index.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{index} is not a valid model_index.json ({type(e).__name__}: {e})") from e
    if not isinstance(out, dict) or not isinstance(out.get("_class_name"), str):
        raise ValueError(f"{index} names no pipeline class (_class_name)")
    return out


def pipeline_class_name(folder: str | os.PathLike) -> str:
    """`_class_name` of a pipeline folder's model_index.json: known before any weights load, so a
    pipeline that does not fit the task is refused at once."""
    return _model_index(Path(folder))["_class_name"]


def load_pipeline(source: str | os.PathLike, device: torch.device, dtype: torch.dtype, task: str | None = None):
    """A supported diffusers pipeline (`pipelines.FAMILIES`) from a local folder or a Hub id.
    `task` set: the pipeline must fit it (checked before loading weights)."""
    from diffusers import DiffusionPipeline

    folder = pipeline_folder(source)
    name = pipeline_class_name(folder)
    pipelines.family_of(name, task)
    if name == "PaintByExamplePipeline":
        pipe = _load_paint_by_example(folder, dtype)
    else:
        pipe = DiffusionPipeline.from_pretrained(str(folder), dtype=dtype)
    pipelines.family_of(pipe, task)
    return pipe.to(device)


def _load_paint_by_example(folder: Path, dtype: torch.dtype):
    """`PaintByExamplePipeline`, component by component.

    diffusers 0.42.1 cannot load this deprecated pipeline with `from_pretrained`: the Hub's
    model_index.json declares its image encoder as ["paint_by_example", ...], a module that moved
    to `pipelines.deprecated`, and the pipeline's own `save_pretrained` writes ["diffusers", ...],
    a class diffusers does not export; either raises, even with the component passed in.
    """
    import diffusers
    import transformers
    from diffusers.pipelines.deprecated.paint_by_example import PaintByExampleImageEncoder
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    classes = {"PaintByExampleImageEncoder": PaintByExampleImageEncoder,
               "StableDiffusionSafetyChecker": StableDiffusionSafetyChecker}
    index = _model_index(folder)
    parts = {}
    for name in ("vae", "image_encoder", "unet", "scheduler", "safety_checker", "feature_extractor"):
        spec = index.get(name)
        cls_name = spec[1] if isinstance(spec, list) and len(spec) == 2 else None
        if cls_name is None:
            parts[name] = None
            continue
        cls = classes.get(cls_name) or getattr(diffusers, cls_name, None) or getattr(transformers, cls_name, None)
        if cls is None:
            raise ValueError(f"{folder / 'model_index.json'}: unknown class {cls_name!r} for {name}")
        kwargs = {"dtype": dtype} if issubclass(cls, torch.nn.Module) else {}
        parts[name] = cls.from_pretrained(folder, subfolder=name, **kwargs)
    return diffusers.PaintByExamplePipeline(**parts,
                                            requires_safety_checker=bool(index.get("requires_safety_checker")))


def load_asym(ckpt, *, vae=None, use_ema: bool = False, trust_pickle: bool = False, device=None, dtype=None,
              need_branch: bool = True):
    """Our `AsymmetricAutoencoder` from anything `load_autoencoder` reads (diffusers folders, training
    checkpoints and run folders, authors' checkpoints), in eval mode.

    Any VAE family: the frozen encoder, latent channels (4, or 16 for FLUX / SD3, without quant
    convs) and scaling come from the checkpoint's (or `vae`'s) AutoencoderKL config.
    `need_branch`: refuse a plain decoder (`blend: none`; editing has nothing to compare then).
    """
    model = load_autoencoder(ckpt, vae=vae, use_ema=use_ema, trust_pickle=trust_pickle)
    if need_branch and model.blend == "none":
        raise ValueError(f"{ckpt} is a plain decoder (blend 'none', no conditional branch): nothing to compare")
    return model.to(device=device, dtype=dtype).eval()


def check_encoder(pipe_vae, asym) -> bool:
    """Our decoder was trained on latents of *its* frozen encoder: the pipeline's must be the same.

    Different latent channels: error (decoding would fail). Different weights, scaling or shift:
    warning (the comparison then mixes two latent spaces; decoding uses the pipeline's scaling).
    Returns True when the encoders are identical.
    """
    theirs_cfg = pipe_vae.config
    if theirs_cfg.latent_channels != asym.latent_channels:
        raise ValueError(f"the pipeline's VAE has {theirs_cfg.latent_channels} latent channels, our checkpoint "
                         f"{asym.latent_channels}: this decoder belongs to another VAE family")
    # A shift of None: unknown (diffusers' AsymmetricAutoencoderKL config cannot hold one), not a difference.
    for key, ours in (("scaling_factor", asym.scaling_factor), ("shift_factor", asym.shift_factor)):
        if ours is not None and (theirs_cfg.get(key) or 0.0) != ours:
            log.warning("latent %s differs: pipeline %s, checkpoint %s (decoding uses the pipeline's)",
                        key, theirs_cfg.get(key), ours)
    theirs = pipe_vae.state_dict()
    ours = {k: v for k, v in asym.state_dict().items() if k.startswith(("encoder.", "quant_conv."))}
    if "quant_conv.weight" not in theirs and _is_identity(asym.quant_conv):
        # FLUX / SD3 VAEs have no quant convs; a diffusers export of our decoder adds identity ones.
        ours = {k: v for k, v in ours.items() if not k.startswith("quant_conv.")}
    differ = [k for k, v in ours.items()
              if k not in theirs or theirs[k].shape != v.shape or not torch.equal(theirs[k].to(v), v)]
    if differ:
        log.warning("the pipeline's VAE encoder differs from our checkpoint's frozen encoder (%d of %d tensors, "
                    "e.g. %s): the latents are not the ones our decoder was trained on, so the comparison is "
                    "not meaningful. Use the pipeline whose VAE the decoder was trained with.",
                    len(differ), len(ours), differ[0])
    return not differ


def _is_identity(conv) -> bool:
    if conv is None:
        return True
    w = conv.weight.detach().flatten(1)
    return (w.shape[0] == w.shape[1] and torch.equal(w, torch.eye(w.shape[0], dtype=w.dtype, device=w.device))
            and (conv.bias is None or not conv.bias.detach().any()))


# ---------------------------------------------------------------------- decoding
@contextmanager
def _float32(module: torch.nn.Module, needed: bool):
    """Run `module` in fp32 for the block, then cast it back (diffusers' SDXL `force_upcast`)."""
    dtype = next(module.parameters()).dtype
    if needed:
        module.to(torch.float32)
    try:
        yield torch.float32 if needed else dtype
    finally:
        if needed:
            module.to(dtype)


@contextmanager
def _vae_tiling(vae, tile: int | None, factor: int):
    """diffusers' own tiled decoding for the pipeline's VAE at our tile size (latent pixels), for the block."""
    if tile is None:
        yield
        return
    names = ("use_tiling", "tile_latent_min_size", "tile_sample_min_size")
    before = [getattr(vae, n) for n in names]
    vae.use_tiling, vae.tile_latent_min_size, vae.tile_sample_min_size = True, tile, tile * factor
    try:
        yield
    finally:
        for n, v in zip(names, before):
            setattr(vae, n, v)


def decode(pipe, asym, family: Family, z: torch.Tensor, cond, tile: int | None = None) -> dict[str, torch.Tensor]:
    """{"vanilla": the pipeline VAE's decode, "asym": ours with `cond` = (image, mask) or None}, same `z`."""
    vae = pipe.vae
    # SDXL's VAE overflows in fp16: its pipelines decode in fp32 when the config says `force_upcast`.
    # Our decoder, trained on the same latents, gets the same treatment.
    upcast = family.upcast_fp16_vae and vae.dtype == torch.float16 and bool(vae.config.get("force_upcast"))
    out = {}
    with _float32(vae, upcast) as dtype, _vae_tiling(vae, tile, pipe.vae_scale_factor):
        out["vanilla"] = vae.decode(z.to(dtype)).sample
    if cond is None:
        cond = pipelines.t2i_condition(asym, z)
    with _float32(asym, upcast) as dtype:
        kwargs = {} if cond is None else {"image": cond[0].to(dtype), "mask": cond[1].to(dtype)}
        if tile is not None:
            kwargs["tile"] = tile
        out["asym"] = asym.decode(z.to(dtype), **kwargs)
    return out


def to_pil(pipe, x: torch.Tensor, name: str, dtype: torch.dtype) -> list[Image.Image]:
    """Decoded batch -> PIL images, through the pipeline's safety checker (if it has one) and postprocess."""
    nsfw = None
    if getattr(pipe, "run_safety_checker", None) is not None:
        x, nsfw = pipe.run_safety_checker(x, pipe._execution_device, dtype)
        if nsfw is not None and any(nsfw):
            log.warning("%s: the safety checker blacked out %d image(s)", name, sum(nsfw))
    return pipe.image_processor.postprocess(x, output_type="pil",
                                            do_denormalize=None if nsfw is None else [not n for n in nsfw])


# ---------------------------------------------------------------------- one edit
@torch.inference_mode()
def edit(pipe, asym, prep, *, task: str | None = None, tile: int | None = None,
         **run_kwargs) -> dict[str, list[Image.Image]]:
    """One diffusion run, two decodes -> {"vanilla": [...], "asym": [...]} PIL images at `prep.size`.

    `prep`: `io.prepare(...)` (editing tasks; `example_path=` for Paint-by-Example) or
    `io.prepare_size(...)` (t2i), at multiples of `pipelines.size_multiple(pipe)`.
    `run_kwargs`: `pipelines.run`'s (prompt, negative_prompt, seed, steps, guidance_scale, strength,
    num_images, and anything the pipeline takes, e.g. prompt_embeds). `tile`: latent tile size
    for both decoders (ours: `AsymmetricAutoencoder.decode(tile=)`, theirs: diffusers' tiling).
    """
    family = pipelines.family_of(pipe, task)
    multiple = pipelines.size_multiple(pipe)
    if any(s % multiple for s in prep.work_size):
        raise ValueError(f"working size {prep.work_size} is not a multiple of {multiple} ({family.name}): "
                         f"prepare the inputs with multiple={multiple}")
    if family.task == "example" and prep.example is None:
        raise ValueError("Paint-by-Example needs an example image (--example)")
    latents = pipelines.run(pipe, family, prep, **run_kwargs)
    z = pipelines.to_z(pipe, latents, prep)
    cond = pipelines.condition(pipe, family, prep)
    if cond is not None:
        # Repeated to the latents' batch: diffusers' own asymmetric-VAE path forgets to (KeyError with
        # num_images_per_prompt > 1), one reason we decode ourselves (see ldm_asym.editing).
        cond = tuple(t.to(z.device).repeat(len(z), 1, 1, 1) for t in cond)
    decoded = decode(pipe, asym, family, z, cond, tile=tile)
    return {name: [prep.restore(p) for p in to_pil(pipe, x, name, latents.dtype)] for name, x in decoded.items()}
