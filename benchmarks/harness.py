"""Benchmark harness: our decoder against diffusers' `AsymmetricAutoencoderKL` with the same weights.

Not part of the library (`ldm_asym` needs none of it): `scripts/benchmark.py` and
`scripts/gpu_check.py` use it. One process builds our `AsymmetricAutoencoder` for a variant (random
weights, seeded) and converts it with `ldm_asym.interop.to_diffusers`, so both models hold identical
tensors. It then measures, after warm-up and as medians of interleaved repeats (ours, reference,
ours, reference, ...):

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
Data loading is `benchmarks/data.py`, the command line and tables `benchmarks/cli.py`;
docs/benchmarks.md has the numbers and the commands.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

# The repo root: memory probes run `benchmarks.harness` in subprocesses, which need it on sys.path.
REPO_ROOT = Path(__file__).resolve().parents[1]


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
def keeps_torch_threads(main):
    """For CLI mains that tests also call in-process: leave torch's thread count as it was (resume
    tests compare runs bit for bit across processes, and thread counts change float reductions)."""

    @functools.wraps(main)
    def run(*args, **kwargs):
        threads = torch.get_num_threads()
        try:
            return main(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    return run


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
        "loadavg": loadavg(),
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


def loadavg() -> list[float] | None:
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
        if loss is None:  # decoding: one graph, output conv included
            model.decoder.compile()
        else:  # training: as AsymmetricVQGAN.setup does (output conv eager, no donated buffers)
            torch._functorch.config.donated_buffer = False
            model.decoder.compile_features()
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
                                                 last_layer=self.decoder.conv_out.weight, mask=self.mask)
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
    # benchmarks/ is no installed package: the probe finds it through PYTHONPATH, whatever the cwd.
    pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, PYTHONPATH=pythonpath, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    code = ("import json, sys; from benchmarks.harness import memory_probe; "
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
def run_config(cfg: Config, log: Callable[[str], None] = print, models=None) -> dict:
    """Benchmark one configuration; returns a flat dict (RESULT_KEYS plus details).

    Fields that a configuration does not measure (`--no-train`, `--no-memory`, `--memory-only`)
    are None. `models`: (ours, reference) from `build_models` for cfg's variant, to reuse across
    batch sizes and dtypes (building and converting a large decoder takes seconds); our switches
    are then applied to `ours` in place, so pass them to eager configurations first.
    """
    device = torch.device(cfg.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda, but CUDA is not available")
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
        torch.backends.cudnn.allow_tf32 = cfg.tf32
    if cfg.compile:
        # Compiled code is cached per code object (the decoder's forward), not per module: a sweep
        # of configurations would pass dynamo's recompile limit (8) and silently fall back to eager.
        torch._dynamo.reset()
    result: dict[str, Any] = {"config": asdict(cfg), "label": cfg.label(), "loadavg_start": loadavg()}
    result.update({k: None for k in RESULT_KEYS})
    result.update(reference_train_img_s=None, train_speedup=None, reference_peak_mem_mb=None)
    lpips_pretrained = _lpips_pretrained()
    result["lpips_trunk"] = "pretrained" if lpips_pretrained else "random (same compute)"

    # ---- decode latency and output difference
    ours, ref = models if models is not None else build_models(cfg)
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
    result["loadavg_end"] = loadavg()
    return result


def write_json(path: str | os.PathLike, report: dict) -> None:
    """Write `report` atomically (temporary file + rename): a crash never leaves half a JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
    os.replace(tmp, path)
