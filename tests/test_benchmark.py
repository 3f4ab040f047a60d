"""scripts/benchmark.py (benchmarks/): a CPU smoke test in CI sizes. It checks the report, never the speed."""

import contextlib
import io
import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ is not an installed package

from benchmarks import cli  # noqa: E402
from benchmarks import data as D  # noqa: E402
from benchmarks import harness as B  # noqa: E402


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """One run of the script's main(): tiny, 64², batch 1, 1 repeat, plus --data on 2 small JPEGs.

    In-process (the CPU memory probes still run in their own subprocesses), on one thread: on a
    busy machine two OpenMP threads can be many times slower than one for these tiny ops.
    """
    import torch

    tmp = tmp_path_factory.mktemp("bench")
    jpegs = D.make_jpegs(tmp / "jpegs", photos=None, per_size=2, sizes=((96, 72), (160, 120)))
    out = tmp / "bench.json"
    argv = ["--variant", "tiny", "--size", "64", "--batch", "1", "--warmup", "1", "--repeats", "1",
            "--threads", "1", "--json", str(out), "--data", str(jpegs["96x72"]), "--data-size", "64", "--data-shards"]
    stdout, threads = io.StringIO(), torch.get_num_threads()
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
            assert cli.main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    assert "| tiny 64px b1 cpu fp32 |" in stdout.getvalue()  # the printed table
    return json.loads(out.read_text())


def test_report_has_every_key(report):
    machine = report["machine"]
    assert machine["cpu"] and machine["torch"] and report["torch"] == machine["torch"]
    assert report["settings"]["variant"] == ["tiny"]
    (r,) = report["results"]
    for key in B.RESULT_KEYS + ("reference_train_img_s", "reference_peak_mem_mb", "config", "peak_mem_kind"):
        assert key in r, key
    assert r["config"]["variant"] == "tiny" and r["config"]["size"] == 64 and r["config"]["batch"] == 1
    for key in ("ours_ms", "reference_ms", "speedup", "train_img_s", "reference_train_img_s",
                "peak_mem_mb", "reference_peak_mem_mb", "max_abs_diff", "psnr_db"):
        assert _number(r[key]) and r[key] >= 0, (key, r[key])
    assert r["speedup"] == pytest.approx(r["reference_ms"] / r["ours_ms"])


def test_fp32_outputs_match_diffusers(report):
    (r,) = report["results"]
    assert r["max_abs_diff"] <= 1e-4
    assert r["psnr_db"] > 80


def test_data_loading_report(report):
    data = report["data"]
    (group,) = data["groups"].values()
    assert group["images"] == 2 and _number(group["img_s_per_worker"]) and group["img_s_per_worker"] > 0
    assert _number(group["shards"]["img_s_per_worker"]) and group["shards"]["img_s_per_worker"] > 0
    assert set(group["stage_ms"]) == {"decode", "crop_resize", "to_tensor", "mask"}


def test_output_diff_and_jpegs(tmp_path):
    import torch

    x = torch.rand(1, 3, 8, 8) * 2 - 1
    assert B.output_diff(x, x) == (0.0, B.PSNR_CAP_DB)
    d, p = B.output_diff(x + 0.02, x)
    assert d == pytest.approx(0.02) and p == pytest.approx(10 * math.log10(1 / 0.01**2), abs=0.5)
    folders = D.make_jpegs(tmp_path, photos=None, per_size=1, sizes=((40, 30),))
    (f,) = folders["40x30"].glob("*.jpg")
    from PIL import Image

    with Image.open(f) as im:
        assert im.format == "JPEG" and im.size == (40, 30)


# ---------------------------------------------------------------------- the decoder's fast paths
# (parity of the whole decoder with diffusers is tests/test_model.py's; these pin the pieces.)
@pytest.mark.parametrize("channels_last", [False, True])
def test_upsample_conv_equals_nearest_then_conv(channels_last):
    import torch
    import torch.nn.functional as F

    from ldm_asym.models.decoder import upsample_conv, upsample_taps

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(6, 5, 3, padding=1)
    x = torch.randn(2, 6, 7, 5)
    if channels_last:
        conv, x = conv.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    ref = conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
    g_ref = torch.autograd.grad(ref.square().sum(), [x, conv.weight, conv.bias])
    out = upsample_conv(x, conv, upsample_taps())  # under autograd: the transposed-conv form
    g_out = torch.autograd.grad(out.square().sum(), [x, conv.weight, conv.bias])
    with torch.no_grad():
        out_fwd = upsample_conv(x, conv, upsample_taps())  # forward only: the 2x2 conv + phase copies
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for o in (out, out_fwd):
        assert o.shape == ref.shape == (2, 5, 14, 10)
        assert o.is_contiguous(memory_format=fmt)
        assert (o - ref).abs().max() < 1e-5
    for a, b in zip(g_out, g_ref):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_fast_decoder_trains_like_diffusers_layers(checkpointing):
    """fast=True and fast=False (diffusers' layer forwards): same outputs and gradients."""
    import torch

    from ldm_asym.models import AsymmetricDecoder

    torch.manual_seed(0)
    slow = AsymmetricDecoder(up_widths=[32, 32, 16, 16], resnets_per_level=2, norm_num_groups=8, fast=False)
    B.perturb_(slow, 0)
    fast = AsymmetricDecoder(up_widths=[32, 32, 16, 16], resnets_per_level=2, norm_num_groups=8,
                             gradient_checkpointing=checkpointing)
    fast.load_state_dict(slow.state_dict())
    z, x = torch.randn(2, 4, 4, 4), torch.rand(2, 3, 32, 32) * 2 - 1
    m = (torch.rand(2, 1, 32, 32) > 0.5).float()
    grads = []
    for model in (slow, fast):
        out = model(z, x, m)
        out.square().mean().backward()
        grads.append((out.detach(), [p.grad for p in model.parameters()]))
    (a, ga), (b, gb) = grads
    assert (a - b).abs().max() < 1e-5
    assert all(torch.allclose(p, q, rtol=1e-3, atol=1e-6) for p, q in zip(ga, gb))
    with torch.no_grad():  # the in-place (no autograd) path
        assert (slow(z, x, m) - fast(z, x, m)).abs().max() < 1e-5


@pytest.mark.parametrize("checkpointing", [False, True])
def test_decoder_traces_without_graph_breaks(checkpointing):
    """torch.compile sees the conditioned decoder's compiled region (all but the output conv, which
    training keeps eager for the adaptive weight) as one graph, and the whole decoder too (decoding)."""
    import torch
    import torch._dynamo

    from ldm_asym.models import AsymmetricDecoder

    dec = AsymmetricDecoder(up_widths=[32, 32, 16, 16], resnets_per_level=2, norm_num_groups=8,
                            gradient_checkpointing=checkpointing)
    z, x = torch.randn(1, 4, 4, 4), torch.rand(1, 3, 32, 32) * 2 - 1
    m = (torch.rand(1, 1, 32, 32) > 0.5).float()
    for region in (dec.features, dec):
        torch._dynamo.reset()
        explained = torch._dynamo.explain(region)(z, x, m)
        assert explained.graph_break_count == 0, explained.break_reasons
        assert explained.graph_count == 1


def test_harness_is_not_in_the_library():
    """The benchmark harness lives in benchmarks/, outside the importable library (issue 10)."""
    import importlib.util

    assert importlib.util.find_spec("ldm_asym.benchmark") is None
