"""scripts/gpu_check.py: its CPU smoke run (report complete, loss finite, images/s > 0), section
failures, and the `cuda`-marked tests that the check runs on a GPU (skipped without one)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_asym, masks

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks/ is not an installed package

from benchmarks import gpu_check as G  # noqa: E402
from benchmarks.harness import output_diff  # noqa: E402

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_check.py)")


# ---------------------------------------------------------------------- the smoke run
@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One `--smoke` run as CI and a person would start it: a subprocess, from the repo root."""
    out = tmp_path_factory.mktemp("gpu_check")
    proc = subprocess.run([sys.executable, "scripts/gpu_check.py", "--smoke", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.md").read_text(), proc.stdout


def test_smoke_report_has_every_section(smoke):
    report, _, stdout = smoke
    assert report["mode"] == "smoke" and report["ok"] and report["failed"] == []
    assert list(report["sections"]) == list(G.SECTIONS)
    for name, section in report["sections"].items():
        assert section["status"] == "ok", (name, section)
        assert section["elapsed_s"] >= 0
    env = report["sections"]["environment"]
    assert env["machine"]["torch"] and env["diffusers"] and env["pytorch_lightning"]
    tests = report["sections"]["pytest_cuda"]
    for key in ("passed", "failed", "errors", "skipped", "returncode"):
        assert key in tests, key
    assert tests["failed"] == tests["errors"] == 0 and tests["skipped"] >= 3  # no CUDA here
    assert report["targets"] == G.TARGETS
    assert "== decode: ok" in stdout  # progress is printed


def test_smoke_training_is_finite_and_timed(smoke):
    report, _, _ = smoke
    for name, want in (("train_base", {"checkpointing_off", "checkpointing_on"}),
                       ("train_large_2x", {"checkpointing_off"})):
        section = report["sections"][name]
        assert set(section["runs"]) == want
        spec = G.SMOKE.train[name]
        for run in section["runs"].values():
            assert run["loss_finite"] and run["losses_finite"] and run["weights_finite"]
            assert run["batches"] == run["steps"] == spec["steps"]
            assert run["losses_seen"] > spec["steps"]  # G every step, D from disc_start on
            assert run["img_s_before_gan"] > 0 and run["img_s_after_gan"] > 0
            assert run["peak_mem_mb"] > 0 and run["nonfinite_skipped"] == 0
        assert section["meets_target"] is None  # targets are for GPUs
    assert "checkpointing_memory_saving_pct" in report["sections"]["train_base"]


def test_smoke_decode_rows(smoke):
    report, _, _ = smoke
    rows = report["sections"]["decode"]["rows"]
    assert [(r["dtype"], r["batch"]) for r in rows] == [("fp32", 1), ("fp32", 2), ("bf16", 1), ("bf16", 2)]
    for r in rows:
        assert "error" not in r, r
        assert r["ours_ms"] > 0 and r["reference_ms"] > 0 and r["speedup"] > 0
        if r["dtype"] == "fp32":  # same weights: equal outputs
            assert r["max_abs_diff"] <= 1e-4
        else:
            assert r["target_speedup"] == 2.0 and r["psnr_db"] > 30


def test_smoke_markdown(smoke):
    report, md, stdout = smoke
    assert md in stdout  # the table is also printed
    for heading in ("# GPU check (smoke", "| section | status | seconds |", "`pytest -m cuda`:",
                    "## Training", "## Decode 64²", "| tiny | 2 | bf16 | channels_last |", "| tiny | 1 | fp32 | eager |"):
        assert heading in md, heading
    assert md.count("| train_base checkpointing_") == 2 and "| train_large_2x checkpointing_off |" in md
    assert md.count("| tiny |") == 4 and "≥ 100 (GPU)" in md and "≥ 2× (GPU)" in md
    assert "## Problems" not in md


# ---------------------------------------------------------------------- failures are recorded
def test_a_failing_section_is_recorded_and_the_rest_runs(tmp_path, monkeypatch):
    def boom(plan, out, log, save):
        raise RuntimeError("no GPU today")

    def two_failed(plan, out, log, save):
        out.update(passed=0, failed=2, errors=0, skipped=0)
        out["problems"].append("2 failed")

    monkeypatch.setitem(G.SECTION_FNS, "environment", boom)
    monkeypatch.setitem(G.SECTION_FNS, "pytest_cuda", two_failed)
    assert G.main(["--smoke", "--only", "environment", "pytest_cuda", "--out", str(tmp_path)]) == 1
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    env = report["sections"]["environment"]
    assert env["status"] == "failed" and env["error"]["type"] == "RuntimeError" and "no GPU today" in env["error"]["message"]
    assert report["sections"]["pytest_cuda"]["status"] == "failed"
    assert report["sections"]["decode"] == {"status": "skipped"}
    assert report["failed"] == ["environment", "pytest_cuda"] and not report["ok"]
    md = (tmp_path / "gpu_check.md").read_text()
    assert "- environment: RuntimeError: no GPU today" in md and "- pytest_cuda: 2 failed" in md


# ---------------------------------------------------------------------- run by the check on a GPU
@pytest.fixture
def exact_fp32():
    """fp32 on the GPU means fp32 here: cuDNN convolutions default to TF32 on Ampere and later."""
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


def _inputs(b: int, hw: int):
    m = torch.cat([v[:1] for v in masks(1, hw, hw).values()])[:b]
    x, z = torch.rand(b, 3, hw, hw) * 2 - 1, torch.randn(b, 4, hw // 8, hw // 8)
    return z.cuda(), x.cuda(), m.cuda()


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("name", ["tiny", "x-1-5", "x-2"])
def test_cuda_decoder_parity_with_diffusers(name, exact_fp32):
    """tests/test_model.py's parity, on the GPU: same converted weights, fp32, max |diff| <= 1e-4."""
    from ldm_asym.interop import from_diffusers

    ref = make_asym(name)
    ours = from_diffusers(ref).eval().cuda()
    ref = ref.cuda()
    z, x, m = _inputs(3, 64)
    with torch.no_grad():
        assert (ours.decode(z) - ref.decode(z).sample).abs().max() <= 1e-4
        assert (ours.decode(z, image=x, mask=m) - ref.decode(z, image=x, mask=m).sample).abs().max() <= 1e-4


@pytest.mark.cuda
@needs_cuda
def test_cuda_bf16_decode_is_finite_and_close(exact_fp32):
    from ldm_asym.interop import from_diffusers

    ours = from_diffusers(make_asym("x-1-5")).eval().cuda()
    z, x, m = _inputs(2, 128)
    with torch.no_grad():
        want = ours.decode(z, image=x, mask=m)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got = ours.decode(z, image=x, mask=m)
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    assert output_diff(got.float(), want)[1] > 35  # dB; CPU bf16 gives ~49 dB with random weights


@pytest.mark.cuda
@needs_cuda
def test_cuda_checkpointing_same_grads_channels_last(exact_fp32):
    from ldm_asym.models import AsymmetricDecoder

    torch.manual_seed(0)
    dec = AsymmetricDecoder(up_widths=[64, 64, 32, 32], resnets_per_level=2, norm_num_groups=8).cuda()
    dec = dec.to(memory_format=torch.channels_last)
    z, x, m = (t.contiguous(memory_format=torch.channels_last) for t in _inputs(2, 64))

    def grads(checkpointing: bool):
        dec.gradient_checkpointing = checkpointing
        dec.zero_grad()
        dec(z, x, m).square().mean().backward()
        return [p.grad.clone() for p in dec.parameters()]

    for a, b in zip(grads(False), grads(True)):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
