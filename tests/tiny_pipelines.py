"""Tiny random diffusers pipelines for the editing tests, built here from configs (offline, seconds).

SD pipelines get a tiny CLIP text model and a BPE tokenizer written from scratch, so they also run
from the command line. SDXL and FLUX are built without text encoders and tokenizers by default (tests
pass `prompt_embeds(family)` instead); given a `text_folder` (where the tokenizer files go) they get
tiny ones too: SDXL two CLIP text models (the second with projection), FLUX a CLIP text model and a
T5 encoder with a Unigram (SentencePiece-style) tokenizer written with `tokenizers`, so they also run
from the command line.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch
from conftest import TINY_VAE, make_vae, perturb_

TINY_VAE_16 = dict(TINY_VAE, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
                   scaling_factor=0.3611, shift_factor=0.1159)  # FLUX.1's VAE, shrunk
SDXL_VAE = dict(TINY_VAE, scaling_factor=0.13025)
_UNET = dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
             attention_head_dim=8, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
             up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))


def tiny_tokenizer(folder: Path):
    """A CLIP BPE tokenizer from files written here: single letters (plain and word-final), no merges."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    tokens = ["<|startoftext|>", "<|endoftext|>"] + list(string.ascii_lowercase)
    tokens += [c + "</w>" for c in string.ascii_lowercase]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16), len(tokens)


def tiny_t5_tokenizer(folder: Path):
    """A T5 tokenizer from a `tokenizers` file written here: Unigram over "▁" and single letters, T5's
    special tokens (<pad> 0, </s> 1, <unk> 2), Metaspace pre-tokenizer, "</s>" appended; no sentinels.
    Built as `T5Tokenizer` itself rebuilds it in `from_pretrained`, so it round-trips offline."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import Unigram
    from transformers import T5TokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -3.0) for c in string.ascii_lowercase]
    backend = Tokenizer(Unigram(vocab, unk_id=2, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)])
    backend.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                           special_tokens=[("</s>", 1)])
    backend.save(str(folder / "tokenizer.json"))
    tokenizer = T5TokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), eos_token="</s>", pad_token="<pad>",
                                unk_token="<unk>", extra_ids=0)
    return tokenizer, len(vocab)


def _clip_text(vocab: int, projection: bool = False):
    """A tiny CLIP text model (hidden size 32; with projection: text_embeds of 32) for `tiny_tokenizer`'s ids."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=vocab, hidden_size=32, intermediate_size=37, num_attention_heads=4,
                            num_hidden_layers=2, projection_dim=32, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def _ddim():
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


def sd(folder: Path, inpaint: bool = True):
    """SD 1.x/2.x inpainting (9-channel UNet) or text-to-image pipeline with a tiny tokenizer."""
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    tokenizer, vocab = tiny_tokenizer(folder / "tok")
    text = _clip_text(vocab)
    unet = UNet2DConditionModel(**_UNET, in_channels=9 if inpaint else 4, out_channels=4,
                                cross_attention_dim=32).eval()
    cls = StableDiffusionInpaintPipeline if inpaint else StableDiffusionPipeline
    return cls(vae=make_vae(TINY_VAE), text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=_ddim(),
               safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def sdxl(inpaint: bool = True, latents_stats: bool = False, text_folder: Path | None = None):
    """SDXL inpainting (9-channel UNet) or text-to-image.
    `latents_stats`: a VAE config with `latents_mean` / `latents_std` (SDXL pipelines honour them).
    `text_folder` None: no text encoders (pass `prompt_embeds("sdxl")`); else two tiny CLIP text models
    (hidden 32 + 32 = the UNet's cross_attention_dim 64; the second's text_embeds: the pooled 32 its
    add-embedding takes) and their tokenizers, written to `text_folder`."""
    from diffusers import StableDiffusionXLInpaintPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    # add_time_ids: 6 values x 8 + the pooled text embedding (32)
    unet = UNet2DConditionModel(**_UNET, in_channels=9 if inpaint else 4, out_channels=4, cross_attention_dim=64,
                                addition_embed_type="text_time", addition_time_embed_dim=8,
                                projection_class_embeddings_input_dim=6 * 8 + 32).eval()
    vae_cfg = dict(SDXL_VAE, latents_mean=[0.1, -0.2, 0.05, 0.0], latents_std=[1.1, 0.9, 1.3, 0.8]) \
        if latents_stats else SDXL_VAE
    cls = StableDiffusionXLInpaintPipeline if inpaint else StableDiffusionXLPipeline
    vae = make_vae(vae_cfg)
    text = dict(text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None)
    if text_folder is not None:  # built last: the UNet and VAE are the same with or without
        torch.manual_seed(1)
        tokenizer, vocab = tiny_tokenizer(text_folder / "tok")
        tokenizer_2, vocab_2 = tiny_tokenizer(text_folder / "tok_2")
        text = dict(text_encoder=_clip_text(vocab), text_encoder_2=_clip_text(vocab_2, projection=True),
                    tokenizer=tokenizer, tokenizer_2=tokenizer_2)
    return cls(vae=vae, **text, unet=unet, scheduler=_ddim(), add_watermarker=False)


def paint_by_example():
    """Paint-by-Example with a tiny CLIP-vision example encoder (32 px crops) and its image processor."""
    from diffusers import PaintByExamplePipeline, UNet2DConditionModel
    from diffusers.pipelines.deprecated.paint_by_example import PaintByExampleImageEncoder
    from transformers import CLIPImageProcessor, CLIPVisionConfig

    torch.manual_seed(0)
    encoder = PaintByExampleImageEncoder(CLIPVisionConfig(hidden_size=32, intermediate_size=37, projection_dim=32,
                                                          num_attention_heads=4, num_hidden_layers=4, image_size=32,
                                                          patch_size=8), proj_size=32).eval()
    unet = UNet2DConditionModel(**_UNET, in_channels=9, out_channels=4, cross_attention_dim=32).eval()
    features = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return PaintByExamplePipeline(vae=make_vae(TINY_VAE), image_encoder=encoder, unet=unet, scheduler=_ddim(),
                                  safety_checker=None, feature_extractor=features)


def flux(fill: bool = True, text_folder: Path | None = None):
    """FLUX.1 Fill or text-to-image: a tiny transformer and a 16-channel VAE without quant convs.
    `text_folder` None: no text encoders (pass `prompt_embeds("flux")`); else a tiny CLIP text model
    (pooled output 32 = pooled_projection_dim) and T5 encoder (d_model 32 = joint_attention_dim) with
    their tokenizers, written to `text_folder`."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxFillPipeline, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    packed = 16 * 4  # 16 latent channels in 2x2 patches
    # Fill's input: noisy latents, masked-image latents, and the mask as 8x8 pixels per latent in 2x2 patches.
    in_channels = packed + packed + 8 * 8 * 4 if fill else packed
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=in_channels, out_channels=packed, num_layers=1,
                                         num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                                         joint_attention_dim=32, pooled_projection_dim=32,
                                         axes_dims_rope=[4, 4, 8]).eval()
    cls = FluxFillPipeline if fill else FluxPipeline
    vae = make_vae(TINY_VAE_16)
    text = dict(text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    if text_folder is not None:  # built last: the transformer and VAE are the same with or without
        from transformers import T5Config, T5EncoderModel

        torch.manual_seed(1)
        tokenizer, vocab = tiny_tokenizer(text_folder / "tok")
        tokenizer_2, vocab_2 = tiny_t5_tokenizer(text_folder / "tok_2")
        t5 = T5EncoderModel(T5Config(vocab_size=vocab_2, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                     relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                                     decoder_start_token_id=0)).eval()
        text = dict(text_encoder=_clip_text(vocab), tokenizer=tokenizer, text_encoder_2=t5, tokenizer_2=tokenizer_2)
    return cls(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, **text, transformer=transformer)


def prompt_embeds(family: str) -> dict:
    """Stand-ins for a text encoder's output (fixed seed), for pipelines built without one."""
    g = torch.Generator().manual_seed(7)
    if family == "sdxl":
        return {"prompt_embeds": torch.randn(1, 8, 64, generator=g),
                "pooled_prompt_embeds": torch.randn(1, 32, generator=g)}
    if family == "flux":
        return {"prompt_embeds": torch.randn(1, 8, 32, generator=g),
                "pooled_prompt_embeds": torch.randn(1, 32, generator=g)}
    raise KeyError(family)


def asym_for(vae, seed: int = 1, blend: str = "add"):
    """Our decoder for `vae`'s latent space: its frozen encoder (any channels, quant convs or not) and
    a random decoder with the conditional branch, shaped like conftest's "tiny" (exportable to diffusers)."""
    from ldm_asym.models.autoencoder import AsymmetricAutoencoder

    torch.manual_seed(seed)
    model = AsymmetricAutoencoder(vae_config=dict(vae.config),
                                  decoder=dict(up_widths=[64, 64, 64, 32], resnets_per_level=2, blend=blend))
    perturb_(model.decoder, seed)
    frozen = {k: v for k, v in vae.state_dict().items() if not k.startswith("decoder.")}
    missing, unexpected = model.load_state_dict(frozen, strict=False)
    assert not unexpected and all(k.startswith("decoder.") for k in missing)
    return model.eval()
