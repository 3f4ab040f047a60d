"""Benchmarks: our decoder against diffusers' `AsymmetricAutoencoderKL` with the same weights.

One process builds our `AsymmetricAutoencoder` for a variant (random weights, seeded) and converts it
with `ldm_asym.interop.to_diffusers`, so both models hold identical tensors. It then measures, after
warm-up and as medians of interleaved repeats (ours, reference, ours, reference, ...):

* decode latency with image + mask (`decode(..., check_inputs=False)` against diffusers' `decode`);
* one full training step: frozen encode, decode with image + mask, L1 + LPIPS + GAN generator loss
  (GAN active, adaptive weight included), backward, Adam step; then the discriminator loss,
  backward, Adam step; reported as images/s;
* peak memory of a training step: `torch.cuda.max_memory_allocated` on CUDA; on CPU the peak RSS
  of a fresh subprocess per model (see `cpu_peak_rss`), as ru_maxrss is a process-wide high-water
  mark that one process running both models cannot split;
* the output difference to diffusers in fp32 (max |diff| and PSNR on the [0, 1] scale).

Our fast-path switches (channels_last, torch.compile, gradient checkpointing, bf16 autocast) apply
to our model; the reference always runs diffusers' defaults in the same dtype (autocast for bf16).
`data_benchmark` measures the training dataset (JPEG decode with draft mode, crop, mask) per worker.

Run it through `scripts/benchmark.py`; docs/benchmarks.md has the numbers and the commands.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

# Decoder variants (DESIGN §3). tiny = configs/tiny.yaml, small enough for CI.
VARIANTS: dict[str, dict[str, Any]] = {
    "tiny": {
        "vae_config": {"block_out_channels": [32, 32, 64, 64], "layers_per_block": 1, "norm_num_groups": 8},
        "decoder": {"up_widths": [64, 64, 64, 32], "resnets_per_level": 2},
    },
    "base": {"vae_config": {}, "decoder": {"up_widths": [512, 512, 256, 128], "resnets_per_level": 3}},
    "large_1.5x": {"vae_config": {}, "decoder": {"up_widths": [768, 768, 384, 192], "resnets_per_level": 4}},
    "large_2x": {"vae_config": {}, "decoder": {"up_widths": [1024, 1024, 512, 256], "resnets_per_level": 6}},
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Keys every configuration's result holds (tests/test_benchmark.py checks them).
RESULT_KEYS = (
    "ours_ms", "reference_ms", "speedup", "train_img_s", "peak_mem_mb", "max_abs_diff", "psnr_db",
)
PSNR_CAP_DB = 300.0  # identical outputs; keeps the JSON numeric


@dataclass
class Config:
    """One benchmarked configuration."""

    variant: str = "tiny"
    size: int = 256
    batch: int = 1
    device: str = "cpu"
    dtype: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    checkpointing: bool = False
    fast: bool = True  # our decoder's fast paths (False = diffusers' block forwards, for A/B runs)
    warmup: int = 1
    repeats: int = 5
    train: bool = True
    memory: bool = True
    timing: bool = True  # False: outputs and memory only (--memory-only)
    tf32: bool = False
    seed: int = 0

    def label(self) -> str:
        switches = [s for s, on in (("cl", self.channels_last), ("compile", self.compile),
                                    ("ckpt", self.checkpointing), ("slow", not self.fast)) if on]
        return (f"{self.variant} {self.size}px b{self.batch} {self.device} {self.dtype}"
                + (" +" + "+".join(switches) if switches else ""))


# ---------------------------------------------------------------------- machine
def machine_info(device: str = "cpu") -> dict:
    """CPU model, cores, threads, GPU name, library versions, load average."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": None,
        "loadavg": _loadavg(),
    }
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except ImportError:  # pragma: no cover
        info["diffusers"] = None
    try:
        with open("/proc/meminfo") as f:
            info["memory_gb"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


# ---------------------------------------------------------------------- models and inputs
def perturb_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Make GroupNorm affines and biases non-trivial (they are 1 / 0 at init) so every tensor counts."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g).to(p.device, p.dtype))
    return model


def build_models(cfg: Config):
    """(ours, reference): our autoencoder and diffusers' AsymmetricAutoencoderKL with identical weights."""
    from ldm_asym.interop import to_diffusers
    from ldm_asym.models import AsymmetricAutoencoder

    if cfg.variant not in VARIANTS:
        raise ValueError(f"unknown variant {cfg.variant!r}; choose from {', '.join(VARIANTS)}")
    spec = VARIANTS[cfg.variant]
    torch.manual_seed(cfg.seed)
    ours = AsymmetricAutoencoder(
        vae_config=spec["vae_config"],
        decoder={**spec["decoder"], "blend": "add", "gradient_checkpointing": cfg.checkpointing, "fast": cfg.fast},
    )
    perturb_(ours, cfg.seed).eval()
    with _quiet_diffusers():
        ref = to_diffusers(ours).eval()
    return ours.to(cfg.device), ref.to(cfg.device)


@contextlib.contextmanager
def _quiet_diffusers():
    """to_diffusers' `.to(dtype)` makes diffusers log a warning about fp32 modules; it does not apply."""
    from diffusers.utils import logging as dlog

    level = dlog.get_verbosity()
    dlog.set_verbosity_error()
    try:
        yield
    finally:
        dlog.set_verbosity(level)


def make_inputs(cfg: Config) -> dict[str, torch.Tensor]:
    """Image in [-1, 1] (smooth random content), LaMa "thick" hole masks, latents ~ N(0, 1)."""
    from ldm_asym.data.masks import MaskGenerator

    g = torch.Generator().manual_seed(cfg.seed + 1)
    b, s = cfg.batch, cfg.size
    coarse = torch.rand(b, 3, max(1, s // 16), max(1, s // 16), generator=g) * 2 - 1
    image = torch.nn.functional.interpolate(coarse, size=(s, s), mode="bilinear", align_corners=False)
    image = (image + 0.1 * torch.randn(b, 3, s, s, generator=g)).clamp(-1, 1)
    gen = MaskGenerator("thick", size=s, p_full=0.0)
    mask = torch.stack([gen(cfg.seed * 1000 + i) for i in range(b)])
    z = torch.randn(b, 4, s // 8, s // 8, generator=g)
    return {k: v.to(cfg.device) for k, v in {"image": image, "mask": mask, "z": z}.items()}


def _autocast(cfg: Config):
    if cfg.dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(cfg.device).type, dtype=DTYPES[cfg.dtype])


def _cl(t: torch.Tensor, on: bool) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last) if on else t


def prepare_ours(model, cfg: Config, loss=None):
    """Apply our switches: channels_last (model, loss nets), torch.compile (decoder, LPIPS, discriminator)."""
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
        if loss is not None:
            loss.to(memory_format=torch.channels_last)
    if cfg.compile:
        model.decoder.compile()
        if loss is not None:
            loss.discriminator.compile()
            loss.perceptual.compile()
    return model


# ---------------------------------------------------------------------- timing
def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str) -> float:
    """Milliseconds of one call, with the device synchronised before and after."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - t0) * 1e3


def interleaved(fns: dict[str, Callable[[], Any]], warmup: int, repeats: int, device: str) -> dict[str, dict]:
    """Warm each function up, then time them in turn; medians and all samples in ms.

    Rounds alternate the order (a, b, then b, a, ...), so neither runs always first (caches,
    allocator state and a machine whose load drifts would otherwise favour one position). The first
    warm-up call's time is kept as `first_ms` (it includes torch.compile's compilation).
    """
    out = {name: {"first_ms": None, "all_ms": []} for name in fns}
    for i in range(max(1, warmup)):
        for name, fn in fns.items():
            ms = timed(fn, device)
            if i == 0:
                out[name]["first_ms"] = ms
    names = list(fns)
    for i in range(max(1, repeats)):
        for name in names if i % 2 == 0 else names[::-1]:
            out[name]["all_ms"].append(timed(fns[name], device))
    for r in out.values():
        r["median_ms"] = statistics.median(r["all_ms"])
        r["min_ms"] = min(r["all_ms"])
    return out


# ---------------------------------------------------------------------- accuracy
def output_diff(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max |out - ref|, PSNR in dB of out vs ref on the [0, 1] scale, clamped; capped at PSNR_CAP_DB)."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    max_abs = (out - ref).abs().max().item()
    a, b = ((out + 1) / 2).clamp(0, 1), ((ref + 1) / 2).clamp(0, 1)
    mse = (a - b).square().mean().item()
    psnr = PSNR_CAP_DB if mse <= 10 ** (-PSNR_CAP_DB / 10) else 10 * math.log10(1.0 / mse)
    return max_abs, psnr


# ---------------------------------------------------------------------- training step
def _lpips_pretrained() -> bool:
    """Use LPIPS' real VGG trunk when it is in the torch hub cache; else a random trunk (same compute)."""
    from ldm_asym.losses import lpips_trunk_path

    path = lpips_trunk_path("vgg")
    return os.path.isfile(path) and os.path.getsize(path) > 0


def make_loss(device: str, lpips_pretrained: bool):
    from ldm_asym.losses import AsymLoss

    torch.manual_seed(1)
    return AsymLoss(disc_start=0, lpips_pretrained=lpips_pretrained).to(device).train()


class TrainStep:
    """One training step of the paper's recipe (GAN on) for our model or diffusers' (`kind`)."""

    def __init__(self, model, kind: str, loss, cfg: Config, inputs: dict[str, torch.Tensor]):
        self.model, self.kind, self.loss, self.cfg = model, kind, loss, cfg
        cl = cfg.channels_last and kind == "ours"
        self.x = _cl(inputs["image"], cl)
        self.mask = _cl(inputs["mask"], cl)
        self.decoder = model.decoder
        # Frozen: encoder and quant convs (ours freezes them itself).
        for name in ("encoder", "quant_conv", "post_quant_conv"):
            module = getattr(model, name, None)
            if module is not None:
                module.requires_grad_(False)
        model.train()
        for name in ("encoder", "quant_conv", "post_quant_conv"):
            module = getattr(model, name, None)
            if module is not None:
                module.eval()
        fused = torch.device(cfg.device).type == "cuda" or None
        self.opt_g = torch.optim.Adam(self.decoder.parameters(), lr=1e-6, betas=(0.5, 0.9), fused=fused)
        self.opt_d = torch.optim.Adam(loss.discriminator.parameters(), lr=1e-6, betas=(0.5, 0.9), fused=fused)
        self.generator = torch.Generator(device=cfg.device).manual_seed(cfg.seed)
        self.step_count = 0

    def _encode_decode(self):
        x, mask = self.x, self.mask
        with torch.no_grad():
            if self.kind == "ours":
                posterior = self.model.encode(x)
            else:
                posterior = self.model.encode(x).latent_dist
            z = posterior.sample(generator=self.generator)
        if self.kind == "ours":
            rec = self.model.decode(z, image=x, mask=mask, check_inputs=False)
        else:
            rec = self.model.decode(z, image=x, mask=mask).sample
        return posterior, rec

    def __call__(self):
        d_params = list(self.loss.discriminator.parameters())
        for p in d_params:  # as Lightning's toggle_optimizer: g_loss leaves no gradient in D
            p.requires_grad_(False)
        with _autocast(self.cfg):
            posterior, rec = self._encode_decode()
            g_loss, _ = self.loss.generator_loss(self.x, rec, posterior, step=self.step_count,
                                                 last_layer=self.decoder.conv_out.weight)
        self.opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        self.opt_g.step()
        for p in d_params:
            p.requires_grad_(True)
        with _autocast(self.cfg):
            d_loss, _ = self.loss.discriminator_loss(self.x, rec.detach(), step=self.step_count)
        self.opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        self.opt_d.step()
        self.step_count += 1
        return g_loss.detach(), d_loss.detach()


def build_train_step(cfg: Config, kind: str, lpips_pretrained: bool) -> TrainStep:
    """A fresh model + loss + optimisers for `kind` ("ours" or "reference")."""
    ours, ref = build_models(cfg)
    model = ours if kind == "ours" else ref
    del ours, ref
    loss = make_loss(cfg.device, lpips_pretrained)
    if kind == "ours":
        prepare_ours(model, cfg, loss)
    return TrainStep(model, kind, loss, cfg, make_inputs(cfg))


# ---------------------------------------------------------------------- CPU peak memory
def _proc_status(key: str) -> float | None:
    """VmRSS / VmHWM of this process in MB (Linux), else None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset this process' RSS high-water mark (VmHWM) to its current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_probe(spec: dict) -> dict:
    """Runs in a fresh process (see `cpu_peak_rss`): peak RSS of one steady-state step of `spec`."""
    cfg = Config(**spec["config"])
    torch.set_num_threads(spec.get("threads", torch.get_num_threads()))
    kind, what = spec["kind"], spec["what"]
    if what == "train":
        step = build_train_step(cfg, kind, spec["lpips_pretrained"])
        fn = step
    else:
        ours, ref = build_models(cfg)
        inputs = make_inputs(cfg)
        model = ours if kind == "ours" else ref
        del ours, ref
        if kind == "ours":
            prepare_ours(model, cfg)
        cl = cfg.channels_last and kind == "ours"
        z, x, m = (_cl(inputs[k], cl) for k in ("z", "image", "mask"))

        def fn():
            with torch.inference_mode(), _autocast(cfg):
                if kind == "ours":
                    return model.decode(z, image=x, mask=m, check_inputs=False)
                return model.decode(z, image=x, mask=m).sample
    fn()  # warm-up: optimiser state, oneDNN caches, compilation
    gc.collect()
    exact = _reset_peak_rss()
    before = _proc_status("VmRSS")
    fn()
    peak = _proc_status("VmHWM")
    if peak is None or before is None:  # not Linux: ru_maxrss (whole-process high-water mark, KB on Linux)
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        before, exact = float("nan"), False
    return {"peak_mb": peak, "before_mb": before, "increase_mb": peak - before, "exact": exact}


def cpu_peak_rss(cfg: Config, kinds: tuple[str, ...], what: str, lpips_pretrained: bool,
                 timeout: float = 3600) -> dict[str, dict]:
    """Peak RSS of one `what` ("train" / "decode") step of each of `kinds`, each in a fresh subprocess.

    ru_maxrss / VmHWM are process-wide high-water marks, so each measurement gets its own process
    (they run concurrently: nothing is timed there). In it, after one warm-up step, the mark is
    reset to the current RSS (/proc/self/clear_refs) and one more step runs: `peak_mb` is the
    process' peak RSS during that step (runtime, weights, optimiser state, activations, gradients),
    `increase_mb` its rise over the RSS just before the step. glibc is told to return every
    allocation >= 64 KiB to the OS on free (MALLOC_MMAP_THRESHOLD_), so RSS follows live memory
    instead of malloc's cache. Without /proc (not Linux) `peak_mb` is ru_maxrss of the whole probe.
    """
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    code = ("import json, sys; from ldm_asym.benchmark import memory_probe; "
            "print('@@RESULT@@' + json.dumps(memory_probe(json.loads(sys.argv[1]))))")
    procs = {}
    for kind in kinds:
        spec = {"config": asdict(cfg), "kind": kind, "what": what, "lpips_pretrained": lpips_pretrained,
                "threads": torch.get_num_threads()}
        procs[kind] = subprocess.Popen([sys.executable, "-c", code, json.dumps(spec)], env=env,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = {}
    for kind, proc in procs.items():
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        lines = [ln for ln in stdout.splitlines() if ln.startswith("@@RESULT@@")]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"memory probe failed ({kind}, {what}, exit {proc.returncode}): {stderr[-2000:]}")
        out[kind] = json.loads(lines[-1][len("@@RESULT@@"):])
    return out


def cuda_peak(fn: Callable[[], Any], device: str) -> float:
    """torch.cuda.max_memory_allocated (MB) during one call of `fn` (after a warm-up call elsewhere)."""
    torch.cuda.synchronize(device)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


# ---------------------------------------------------------------------- one configuration
def run_config(cfg: Config, log: Callable[[str], None] = print) -> dict:
    """Benchmark one configuration; returns a flat dict (RESULT_KEYS plus details).

    Fields that a configuration does not measure (`--no-train`, `--no-memory`, `--memory-only`)
    are None.
    """
    device = torch.device(cfg.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda, but CUDA is not available")
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
        torch.backends.cudnn.allow_tf32 = cfg.tf32
    result: dict[str, Any] = {"config": asdict(cfg), "label": cfg.label(), "loadavg_start": _loadavg()}
    result.update({k: None for k in RESULT_KEYS})
    result.update(reference_train_img_s=None, train_speedup=None, reference_peak_mem_mb=None)
    lpips_pretrained = _lpips_pretrained()
    result["lpips_trunk"] = "pretrained" if lpips_pretrained else "random (same compute)"

    # ---- decode latency and output difference
    ours, ref = build_models(cfg)
    result["attention_processor"] = type(ref.decoder.mid_block.attentions[0].processor).__name__
    inputs = make_inputs(cfg)
    z, x, m = inputs["z"], inputs["image"], inputs["mask"]
    with torch.inference_mode():
        ref_fp32 = ref.decode(z, image=x, mask=m).sample.float()  # the fp32 reference output
    t0 = time.perf_counter()
    prepare_ours(ours, cfg)
    zc, xc, mc = (_cl(t, cfg.channels_last) for t in (z, x, m))

    def decode_ours():
        with torch.inference_mode(), _autocast(cfg):
            return ours.decode(zc, image=xc, mask=mc, check_inputs=False)

    def decode_ref():
        with torch.inference_mode(), _autocast(cfg):
            return ref.decode(z, image=x, mask=m).sample

    result["max_abs_diff"], result["psnr_db"] = output_diff(decode_ours(), ref_fp32)  # compiles, if asked
    result["reference_max_abs_diff"], result["reference_psnr_db"] = output_diff(decode_ref(), ref_fp32)
    result["setup_s"] = round(time.perf_counter() - t0, 2)
    if cfg.timing:
        log(f"[{cfg.label()}] decode: warm-up {cfg.warmup}, {cfg.repeats} interleaved repeats")
        times = interleaved({"ours": decode_ours, "reference": decode_ref}, cfg.warmup, cfg.repeats, cfg.device)
        result.update(
            ours_ms=times["ours"]["median_ms"], reference_ms=times["reference"]["median_ms"],
            ours_min_ms=times["ours"]["min_ms"], reference_min_ms=times["reference"]["min_ms"],
            ours_all_ms=times["ours"]["all_ms"], reference_all_ms=times["reference"]["all_ms"],
        )
        result["speedup"] = result["reference_ms"] / result["ours_ms"]
        result["ours_img_s"] = cfg.batch * 1e3 / result["ours_ms"]
    if device.type == "cuda" and cfg.memory:
        result["decode_peak_mem_mb"] = cuda_peak(decode_ours, cfg.device)
        result["reference_decode_peak_mem_mb"] = cuda_peak(decode_ref, cfg.device)
    del ours, ref, ref_fp32, decode_ours, decode_ref
    gc.collect()

    # ---- training step (on CPU its memory is measured in subprocesses, below)
    if cfg.train and (cfg.timing or (device.type == "cuda" and cfg.memory)):
        steps = {kind: build_train_step(cfg, kind, lpips_pretrained) for kind in ("ours", "reference")}
        if cfg.timing:
            log(f"[{cfg.label()}] training step: warm-up {cfg.warmup}, {cfg.repeats} interleaved repeats")
            times = interleaved(steps, cfg.warmup, cfg.repeats, cfg.device)
            ms, ref_ms = times["ours"]["median_ms"], times["reference"]["median_ms"]
            result.update(
                train_ms=ms, reference_train_ms=ref_ms,
                train_all_ms=times["ours"]["all_ms"], reference_train_all_ms=times["reference"]["all_ms"],
                train_img_s=cfg.batch * 1e3 / ms, reference_train_img_s=cfg.batch * 1e3 / ref_ms,
                train_speedup=ref_ms / ms,
            )
        else:
            for step in steps.values():  # warm-up: optimiser state, cuDNN autotuning, compilation
                step()
        if device.type == "cuda" and cfg.memory:
            result["peak_mem_mb"] = cuda_peak(steps["ours"], cfg.device)
            result["reference_peak_mem_mb"] = cuda_peak(steps["reference"], cfg.device)
        del steps
        gc.collect()

    # ---- memory
    what = "train" if cfg.train else "decode"
    if not cfg.memory:
        result["peak_mem_kind"] = "not measured"
    elif device.type == "cuda":
        if not cfg.train:
            result["peak_mem_mb"] = result["decode_peak_mem_mb"]
            result["reference_peak_mem_mb"] = result["reference_decode_peak_mem_mb"]
        result["peak_mem_kind"] = f"CUDA max_memory_allocated during one {what} step (MB)"
    else:
        log(f"[{cfg.label()}] peak RSS of one {what} step, one subprocess per model")
        probes = cpu_peak_rss(cfg, ("ours", "reference"), what, lpips_pretrained)
        for kind, prefix in (("ours", ""), ("reference", "reference_")):
            result[prefix + "peak_mem_mb"] = probes[kind]["peak_mb"]
            result[prefix + "peak_mem_increase_mb"] = probes[kind]["increase_mb"]
            result[prefix + "rss_before_mb"] = probes[kind]["before_mb"]
        result["peak_mem_kind"] = (f"CPU peak RSS of one {what} step in a fresh subprocess (MB; "
                                   "*_increase_mb: rise over the RSS before the step)")
    result["loadavg_end"] = _loadavg()
    return result


# ---------------------------------------------------------------------- data loading
PHOTO_SIZES = ((500, 375), (1024, 768))


def make_jpegs(out_dir: str | os.PathLike, photos: str | os.PathLike | None = None, per_size: int = 16,
               sizes=PHOTO_SIZES, quality: int = 95, seed: int = 0) -> dict[str, Path]:
    """Write `per_size` photo-like JPEGs of each size in `sizes` to `out_dir/<W>x<H>/`.

    With `photos` (a folder of images, e.g. ../shared/data/inpainting_examples) each JPEG is a
    random crop of a real photo resized to the target size, plus mild sensor-like noise so that
    upscaled crops keep a photo's entropy; without, a synthetic scene (gradients, shapes, noise).
    Returns {"<W>x<H>": folder}.
    """
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    sources = []
    if photos is not None and Path(photos).is_dir():
        for p in sorted(Path(photos).iterdir()):
            if p.suffix.lower() in (".png", ".jpg", ".jpeg") and "mask" not in p.stem:
                with Image.open(p) as im:
                    sources.append(im.convert("RGB"))
    folders = {}
    for w, h in sizes:
        folder = Path(out_dir) / f"{w}x{h}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_size):
            if sources:
                src = sources[i % len(sources)]
                cw = int(src.width * rng.uniform(0.7, 1.0))
                ch = min(src.height, int(cw * h / w))
                x0, y0 = int(rng.integers(0, src.width - cw + 1)), int(rng.integers(0, src.height - ch + 1))
                im = src.resize((w, h), Image.BICUBIC, box=(x0, y0, x0 + cw, y0 + ch))
            else:
                im = _synthetic_photo(rng, w, h, Image, ImageDraw, ImageFilter)
            a = np.asarray(im, dtype=np.float32) + rng.normal(0, 3.0, (h, w, 3))
            Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(folder / f"img_{i:03d}.jpg", quality=quality)
        folders[f"{w}x{h}"] = folder
    return folders


def _synthetic_photo(rng, w, h, Image, ImageDraw, ImageFilter):
    import numpy as np

    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    base = np.stack([c0 + c1 * xx + c2 * yy for c0, c1, c2 in rng.uniform(0, 255, (3, 3)) / [1, 2, 2]], -1)
    im = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for _ in range(40):
        x0, y0 = rng.integers(0, w), rng.integers(0, h)
        r = int(rng.integers(5, max(w, h) // 4))
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0 - r, y0 - r, x0 + r, y0 + r], fill=fill)
    return im.filter(ImageFilter.GaussianBlur(1.5))


def data_benchmark(root: str | os.PathLike | None = None, size: int = 256, photos: str | None = None,
                   per_size: int = 16, passes: int = 5, workers: int = 0, seed: int = 0,
                   samples_per_pass: int = 64, log: Callable[[str], None] = print) -> dict:
    """Images/s of `ImageFolderDataset(..., size, train=True, masks={"preset": "train", "p_full": 0.5})`.

    One process iterating the dataset is what one DataLoader worker does: `img_s_per_worker` is the
    median over `passes` passes of `samples_per_pass` samples (the files cycled, each sample with
    its own seed, i.e. crop and mask). Also timed per sample stage (JPEG decode with draft mode, crop +
    resize, to tensor, mask). Without `root`, photo-like JPEGs of ImageNet sizes (500x375 and
    1024x768) are generated into a temporary folder, one group per size. `workers` > 0 also times
    a DataLoader with that many workers (total images/s and per worker).
    """
    from PIL import Image

    from ldm_asym.data import ImageFolderDataset
    from ldm_asym.data import datasets as D

    tmp = None
    if root is None:
        tmp = tempfile.TemporaryDirectory(prefix="ldm_asym_bench_jpegs_")
        groups = make_jpegs(tmp.name, photos=photos, per_size=per_size, seed=seed)
        source = "real photos re-encoded as JPEG" if photos and Path(photos).is_dir() else "synthetic photo-like JPEGs"
    else:
        groups = {Path(root).name: Path(root)}
        source = str(root)
    out = {"source": source, "size": size, "groups": {}}
    try:
        for name, folder in groups.items():
            ds = ImageFolderDataset(folder, size=size, train=True, masks={"preset": "train", "p_full": 0.5})
            n = len(ds)
            files = [ds.path(i) for i in range(n)]
            with Image.open(files[0]) as im:
                px = im.width * im.height
            nbytes = sum(os.path.getsize(f) for f in files)
            ds[(0, seed)]  # warm caches (file system, imports)
            per_pass = max(n, samples_per_pass)  # cycle the files; every sample gets its own crop and mask
            rates = []
            for p in range(passes):
                t0 = time.perf_counter()
                for i in range(per_pass):
                    ds[(i % n, seed * 1_000_003 + p * per_pass + i)]
                rates.append(per_pass / (time.perf_counter() - t0))
            stages = _stage_times(ds, files, size, seed, D)
            g = {"images": n, "pixels": px, "bits_per_pixel": round(8 * nbytes / (n * px), 2),
                 "samples_per_pass": per_pass, "img_s_per_worker": statistics.median(rates), "img_s_all": rates,
                 "stage_ms": stages}
            if workers > 0:
                g.update(_loader_rate(ds, workers, passes, per_pass, seed))
            out["groups"][name] = g
            log(f"[data {name}] {g['img_s_per_worker']:.0f} images/s per worker ({n} files, {px / 1e3:.0f} kpx)")
    finally:
        if tmp is not None:
            tmp.cleanup()
    out["img_s_per_worker_min"] = min(g["img_s_per_worker"] for g in out["groups"].values())
    return out


def _stage_times(ds, files, size, seed, D) -> dict:
    """Median ms per sample of each stage of `ImageFolderDataset.__getitem__`."""
    times = {"decode": [], "crop_resize": [], "to_tensor": [], "mask": []}
    g = torch.Generator().manual_seed(seed)
    for i, path in enumerate(files):
        crop = ds._random_crop(g)
        t0 = time.perf_counter()
        im = D.load_image(path, math.ceil(size / crop.scale))
        t1 = time.perf_counter()
        im = D.crop_resize(im, size, crop)
        t2 = time.perf_counter()
        D.to_tensor(im)
        t3 = time.perf_counter()
        ds.masks(seed + i)
        t4 = time.perf_counter()
        for k, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            times[k].append(dt * 1e3)
    return {k: round(statistics.median(v), 3) for k, v in times.items()}


def _loader_rate(ds, workers: int, passes: int, per_pass: int, seed: int, batch_size: int = 8) -> dict:
    """A DataLoader with `workers` processes (batches of 8, as training collates): total and per worker."""
    from torch.utils.data import DataLoader

    keys = [(i % len(ds), seed + i) for i in range(per_pass)]
    loader = DataLoader(_Keyed(ds, keys), batch_size=batch_size, num_workers=workers, persistent_workers=True)
    for _ in loader:  # start the workers
        pass
    rates = []
    for _ in range(passes):
        t0 = time.perf_counter()
        for _ in loader:
            pass
        rates.append(per_pass / (time.perf_counter() - t0))
    total = statistics.median(rates)
    return {"loader_workers": workers, "loader_batch_size": batch_size, "loader_img_s": total,
            "loader_img_s_per_worker": total / workers}


class _Keyed(torch.utils.data.Dataset):
    def __init__(self, ds, keys):
        self.ds, self.keys = ds, keys

    def __len__(self):
        return len(self.keys)

    def __getitem__(self, i):
        return self.ds[self.keys[i]]


# ---------------------------------------------------------------------- report
def _fmt(v, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def table(results: list[dict]) -> str:
    """Markdown table of the decode / training / memory / accuracy results."""
    head = ("| configuration | ours ms | diffusers ms | speedup | train img/s ours / diffusers | "
            "peak MB ours / diffusers | max abs diff | PSNR dB |")
    lines = [head, "|" + "---|" * 8]
    for r in results:
        lines.append(
            f"| {r['label']} | {_fmt(r['ours_ms'], '.1f')} | {_fmt(r['reference_ms'], '.1f')} | "
            f"{_fmt(r['speedup'], '.3f')} | {_fmt(r['train_img_s'], '.3g')} / {_fmt(r['reference_train_img_s'], '.3g')} | "
            f"{_fmt(r['peak_mem_mb'], '.0f')} / {_fmt(r['reference_peak_mem_mb'], '.0f')} | "
            f"{_fmt(r['max_abs_diff'], '.2e')} | {_fmt(r['psnr_db'], '.1f')} |"
        )
    return "\n".join(lines)


def data_table(data: dict) -> str:
    lines = ["| JPEGs | kpx | bits/px | images/s per worker | decode ms | crop+resize ms | to tensor ms | mask ms |",
             "|" + "---|" * 8]
    for name, g in data["groups"].items():
        s = g["stage_ms"]
        lines.append(f"| {name} | {g['pixels'] / 1e3:.0f} | {g['bits_per_pixel']} | {g['img_s_per_worker']:.0f} | "
                     f"{s['decode']:.2f} | {s['crop_resize']:.2f} | {s['to_tensor']:.2f} | {s['mask']:.2f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------- CLI
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="scripts/benchmark.py",
        description="Our asymmetric decoder vs diffusers' AsymmetricAutoencoderKL (same weights): decode "
                    "latency, training step, peak memory, output difference; optionally data loading.",
    )
    p.add_argument("--variant", nargs="+", default=["tiny"], choices=list(VARIANTS))
    p.add_argument("--size", nargs="+", type=int, default=[256], help="image side (multiple of 8)")
    p.add_argument("--batch", nargs="+", type=int, default=[1])
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--dtype", nargs="+", default=["fp32"], choices=list(DTYPES),
                   help="bf16 = torch.autocast(bf16) for ours and diffusers alike")
    p.add_argument("--channels-last", action="store_true", help="ours: NHWC model, loss nets and inputs")
    p.add_argument("--compile", action="store_true", help="ours: torch.compile decoder, LPIPS and discriminator in place")
    p.add_argument("--checkpointing", action="store_true", help="ours: gradient checkpointing of the decoder")
    p.add_argument("--no-fast", action="store_true",
                   help="ours: diffusers' block forwards instead of the decoder's fast paths (A/B runs)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5, help="interleaved timed repeats per model (median)")
    p.add_argument("--no-train", action="store_true", help="skip the training-step benchmark")
    p.add_argument("--no-memory", action="store_true", help="skip peak memory (CPU: the subprocesses)")
    p.add_argument("--memory-only", action="store_true",
                   help="only the output difference and peak memory (no timing): e.g. large batches")
    p.add_argument("--tf32", action="store_true", help="CUDA fp32: allow TF32 (off by default: equal outputs)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", nargs="?", const="", default=None, metavar="DIR",
                   help="data-loading benchmark on the JPEGs in DIR; without DIR, ImageNet-sized JPEGs "
                        "(500x375, 1024x768) are generated into a temporary folder")
    p.add_argument("--data-only", action="store_true", help="run only the data-loading benchmark")
    p.add_argument("--data-size", type=int, default=256)
    p.add_argument("--data-images", type=int, default=16, help="generated JPEGs per size")
    p.add_argument("--data-workers", type=int, default=0, help="also time a DataLoader with N workers")
    p.add_argument("--photos", default=str(Path(__file__).resolve().parents[1] / ".." / "shared" / "data" /
                                           "inpainting_examples"),
                   help="real photos to re-encode as JPEGs for --data (synthetic content if missing)")
    p.add_argument("--json", default=None, metavar="FILE", help="write all results here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    report: dict[str, Any] = {
        "machine": machine_info(args.device),
        "command": " ".join([Path(sys.argv[0]).name] + (sys.argv[1:] if argv is None else list(argv))),
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "results": [],
    }
    report["torch"] = report["machine"]["torch"]
    if not args.data_only:
        for variant, size, batch, dtype in itertools.product(args.variant, args.size, args.batch, args.dtype):
            if size % 8:
                raise SystemExit(f"--size {size} is not a multiple of 8")
            cfg = Config(variant=variant, size=size, batch=batch, device=args.device, dtype=dtype,
                         channels_last=args.channels_last, compile=args.compile,
                         checkpointing=args.checkpointing, fast=not args.no_fast, warmup=args.warmup,
                         repeats=args.repeats, train=not args.no_train,
                         memory=args.memory_only or not args.no_memory, timing=not args.memory_only,
                         tf32=args.tf32, seed=args.seed)
            report["results"].append(run_config(cfg, log))
            if args.json:  # keep what is done if a later configuration fails
                _write_json(args.json, report)
        if report["results"]:
            print(table(report["results"]))
    if args.data is not None or args.data_only:
        root = args.data or None
        report["data"] = data_benchmark(root, size=args.data_size, photos=args.photos,
                                        per_size=args.data_images, workers=args.data_workers,
                                        seed=args.seed, log=log)
        print()
        print(data_table(report["data"]))
    report["machine"]["loadavg_end"] = _loadavg()
    if args.json:
        _write_json(args.json, report)
    return 0


def _write_json(path: str, report: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
    os.replace(tmp, path)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
