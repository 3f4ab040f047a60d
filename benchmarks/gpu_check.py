"""One-shot GPU check (`scripts/gpu_check.py`): everything issue 10 asks of a GPU, in one command.

Sections, each recorded in the JSON whatever happens to the others (an exception becomes the
section's `error`, and the check goes on; the exit code is 1 if any section failed):

    environment     machine, GPU, library versions
    pytest_cuda     `pytest -m cuda`: pass / fail counts
    train_base      base decoder at 256², bf16-mixed, channels_last, compile; checkpointing off
                    and on; images/s before and after the GAN starts, peak memory, finite loss
    train_large_2x  the same for large_2x at batch 2, checkpointing off
    decode          large_1.5x / large_2x at 512², batch 1 and 8: ours vs diffusers' eager
                    (same weights), fp32 (both eager: parity) then bf16 (ours channels_last +
                    compile), max |diff| and PSNR against diffusers' fp32 output

`--smoke` runs the same code on the CPU at toy sizes (configs/tiny.yaml's widths, 64 px, a few
steps) in well under a minute; tests/test_gpu_check.py runs it in CI. Targets are for one H100 /
H200 in bf16; the smoke run shows them but does not judge them.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

from benchmarks.harness import (PSNR_CAP_DB, REPO_ROOT, Config, build_models, keeps_torch_threads, machine_info,
                                run_config, write_json)
from benchmarks.train_run import CONFIGS, synthetic_config, train_run

SECTIONS = ("environment", "pytest_cuda", "train_base", "train_large_2x", "decode")
TARGETS = {  # issue 10, one H100 / H200 class GPU, bf16
    "train_base_img_s": 100.0,  # 256², per GPU
    "train_large_2x_img_s": 20.0,
    "decode_bf16_speedup": 2.0,  # vs diffusers' bf16 eager, large_1.5x / large_2x, 512², batch 1 and 8
    "decode_bf16_psnr_db": 60.0,  # vs fp32 (issue 5); shown, not part of the speed target
}


@dataclass
class Plan:
    """Sizes of one check: `GPU` is the real one, `SMOKE` the CPU rehearsal of the same code."""

    device: str = "cuda"
    precision: str = "bf16-mixed"
    compile: bool = True
    pytest_paths: tuple = ("tests",)
    train_size: int = 256
    num_workers: int = 8
    # config name -> run settings; batch None = the config's per-GPU batch
    train: dict = field(default_factory=lambda: {
        "train_base": {"config": "asym_base", "steps": 80, "disc_start": 30, "warmup": 10, "batch": None,
                       "checkpointing": (False, True)},
        "train_large_2x": {"config": "asym_large_2x", "steps": 50, "disc_start": 20, "warmup": 8, "batch": None,
                           "checkpointing": (False,)},
    })
    tiny_model: bool = False  # smoke: configs/tiny.yaml's encoder and decoder sizes
    decode_variants: tuple = ("large_1.5x", "large_2x")
    decode_size: int = 512
    decode_batches: tuple = (1, 8)
    # dtype -> (warm-up calls, timed repeats); fp32 b8 of large_2x costs seconds a call
    decode_repeats: dict = field(default_factory=lambda: {"fp32": (1, 3), "bf16": (2, 7)})
    judge_targets: bool = True


GPU = Plan()
SMOKE = Plan(
    device="cpu", compile=False, pytest_paths=("tests/test_gpu_check.py",), train_size=64, num_workers=0,
    train={"train_base": {"config": "asym_base", "steps": 6, "disc_start": 3, "warmup": 1, "batch": 2,
                          "checkpointing": (False, True)},
           "train_large_2x": {"config": "asym_large_2x", "steps": 6, "disc_start": 3, "warmup": 1, "batch": 2,
                              "checkpointing": (False,)}},
    tiny_model=True, decode_variants=("tiny",), decode_size=64, decode_batches=(1, 2),
    decode_repeats={"fp32": (1, 1), "bf16": (1, 1)}, judge_targets=False,
)


def _need_cuda(plan: Plan) -> None:
    if plan.device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("CUDA is not available (on a machine without a GPU run --smoke)")


# ---------------------------------------------------------------------- sections
# Each section fills `out` (already in the report, with a `problems` list) and calls `save()` after
# each finished piece, so a run stopped by a time limit still leaves its finished rows on disk.
def environment(plan: Plan, out: dict, log, save) -> None:
    out["machine"] = machine_info(plan.device)
    for name in ("pytorch_lightning", "diffusers", "omegaconf", "lpips", "taming", "skimage"):
        try:
            module = __import__(name)
            out[name] = getattr(module, "__version__", "installed")
        except ImportError as e:
            out[name] = None
            out["problems"].append(f"{name} is not importable ({e}); docs/benchmarks.md: carry it as a wheel")
    if plan.device.startswith("cuda"):
        _need_cuda(plan)
        props = torch.cuda.get_device_properties(0)
        out.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                   gpu_memory_gb=round(props.total_memory / 2**30, 1), cudnn=torch.backends.cudnn.version())


def pytest_cuda(plan: Plan, out: dict, log, save) -> None:
    """`pytest -m cuda` in a subprocess (its own CUDA context; a crash there is a result here)."""
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        # A module that fails to import elsewhere (a missing package) must not stop the CUDA tests.
        args = ["-m", "cuda", "-q", "-p", "no:cacheprovider", "--continue-on-collection-errors", *plan.pytest_paths]
        cmd = [sys.executable, "-m", "pytest", *args, f"--junitxml={xml}"]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (str(REPO_ROOT), os.environ.get("PYTHONPATH")))))
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1200)
        counts = _junit_counts(xml) if xml.is_file() else {}
    out.update(command=" ".join(["pytest", *args]), returncode=proc.returncode, **counts,
               output_tail=(proc.stdout + proc.stderr)[-3000:])
    if not counts:
        out["problems"].append(f"pytest wrote no report (exit {proc.returncode})")
    elif counts["failed"] or counts["errors"] or proc.returncode != 0:
        out["problems"].append(f"{counts['failed']} failed, {counts['errors']} errors (exit {proc.returncode})")
    elif plan.device.startswith("cuda") and not counts["passed"]:
        out["problems"].append("no cuda test ran (all skipped: is CUDA visible to pytest?)")


def _junit_counts(xml: Path) -> dict:
    root = ET.parse(xml).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    bad = [f"{c.get('classname')}::{c.get('name')}" for c in root.iter("testcase")
           if c.find("failure") is not None or c.find("error") is not None]
    return {"passed": n["tests"] - n["failures"] - n["errors"] - n["skipped"], "failed": n["failures"],
            "errors": n["errors"], "skipped": n["skipped"], "failing_tests": bad}


def training(name: str) -> Callable:
    def section(plan: Plan, out: dict, log, save) -> None:
        _need_cuda(plan)
        spec = plan.train[name]
        sizes = {}
        if plan.tiny_model:
            from ldm_asym.cli import load_config

            tiny = load_config(CONFIGS / "tiny.yaml").model.params.autoencoder
            sizes = {"vae_config": dict(tiny.vae_config), "decoder": dict(tiny.decoder.params)}
        out.update(config=f"configs/{spec['config']}.yaml", size=plan.train_size, precision=plan.precision,
                   channels_last=True, compile=plan.compile, target_img_s=TARGETS[f"{name}_img_s"], runs={})
        for ckpt in spec["checkpointing"]:
            label = f"checkpointing_{'on' if ckpt else 'off'}"
            log(f"[{name}] {label}: {spec['steps']} steps, GAN from step {spec['disc_start']}")
            try:
                cfg = synthetic_config(spec["config"], plan.train_size, spec["steps"], spec["disc_start"],
                                       batch=spec["batch"], checkpointing=ckpt, compile=plan.compile,
                                       num_workers=plan.num_workers, **sizes)
                run = train_run(cfg, spec["steps"], spec["disc_start"], spec["warmup"],
                                accelerator="cuda" if plan.device.startswith("cuda") else "cpu",
                                precision=plan.precision)
                if not run["loss_finite"]:
                    out["problems"].append(f"{label}: loss or weights not finite")
                log(f"[{name}] {label}: {_f(run['img_s_before_gan'], '.1f')} / {_f(run['img_s_after_gan'], '.1f')} "
                    f"images/s before / after the GAN start, peak {_f(run['peak_mem_mb'], '.0f')} MB")
            except Exception as e:  # keep the other run
                run = {"error": _error(e)}
                out["problems"].append(f"{label}: {run['error']['message']}")
            out["runs"][label] = run
            save()
            _free(plan)
        runs = out["runs"]
        if all(runs.get(k, {}).get("peak_mem_mb") for k in ("checkpointing_off", "checkpointing_on")):
            off, on = runs["checkpointing_off"]["peak_mem_mb"], runs["checkpointing_on"]["peak_mem_mb"]
            out["checkpointing_memory_saving_pct"] = 100 * (1 - on / off)
        rates = [r.get("img_s_after_gan") for r in runs.values() if r.get("img_s_after_gan")]
        out["meets_target"] = (max(rates) >= out["target_img_s"] if rates else False) if plan.judge_targets else None

    return section


def decode(plan: Plan, out: dict, log, save) -> None:
    """Models are built once per variant; fp32 rows run first (both eager), then bf16 rows turn on
    our switches in place (channels_last, compile), so each row's setting is as labelled."""
    _need_cuda(plan)
    out.update(size=plan.decode_size, rows=[])
    for variant in plan.decode_variants:
        try:
            models = build_models(Config(variant=variant, size=plan.decode_size, device=plan.device))
        except Exception as e:
            out["problems"].append(f"{variant}: building the models failed: {_error(e)['message']}")
            continue
        for dtype in ("fp32", "bf16"):
            warmup, repeats = plan.decode_repeats[dtype]
            fast = dtype == "bf16"
            for batch in plan.decode_batches:
                cfg = Config(variant=variant, size=plan.decode_size, batch=batch, device=plan.device, dtype=dtype,
                             channels_last=fast, compile=fast and plan.compile, warmup=warmup, repeats=repeats,
                             train=False, memory=fast and plan.device.startswith("cuda"))
                switches = [n for n, on in (("channels_last", cfg.channels_last), ("compile", cfg.compile)) if on]
                row = {"variant": variant, "batch": batch, "dtype": dtype, "label": cfg.label(),
                       "ours_switches": " + ".join(switches) or "eager"}
                try:
                    r = run_config(cfg, lambda s: log("  " + s), models=models)
                    row.update({k: r.get(k) for k in (
                        "ours_ms", "reference_ms", "speedup", "max_abs_diff", "psnr_db", "reference_max_abs_diff",
                        "reference_psnr_db", "peak_mem_mb", "reference_peak_mem_mb", "setup_s",
                        "ours_all_ms", "reference_all_ms")})
                    if dtype == "bf16":
                        row["target_speedup"] = TARGETS["decode_bf16_speedup"]
                        row["meets_target"] = r["speedup"] >= row["target_speedup"] if plan.judge_targets else None
                    log(f"[decode] {cfg.label()}: {r['ours_ms']:.1f} vs {r['reference_ms']:.1f} ms "
                        f"({r['speedup']:.2f}x), PSNR {r['psnr_db']:.1f} dB")
                except Exception as e:
                    row["error"] = _error(e)
                    out["problems"].append(f"{cfg.label()}: {row['error']['message']}")
                out["rows"].append(row)
                save()
                _free(plan)
        del models
        _free(plan)
    judged = [r.get("meets_target") for r in out["rows"] if r["dtype"] == "bf16"]
    out["meets_target"] = (bool(judged) and all(judged)) if plan.judge_targets else None


SECTION_FNS: dict[str, Callable] = {
    "environment": environment, "pytest_cuda": pytest_cuda, "train_base": training("train_base"),
    "train_large_2x": training("train_large_2x"), "decode": decode,
}


# ---------------------------------------------------------------------- running and reporting
def run_section(report: dict, name: str, fn: Callable[[dict], None], log) -> dict:
    """Run one section; an exception or a listed problem marks it failed, the caller goes on."""
    log(f"== {name}")
    out = report["sections"][name] = {"status": "running", "problems": []}
    t0 = time.perf_counter()
    try:
        fn(out)
        out["status"] = "failed" if out["problems"] else "ok"
    except Exception as e:
        out.update(status="failed", error=_error(e))
    out["elapsed_s"] = round(time.perf_counter() - t0, 1)
    log(f"== {name}: {out['status']} ({out['elapsed_s']} s)")
    return out


def _error(e: BaseException) -> dict:
    return {"type": type(e).__name__, "message": str(e)[:2000],
            "traceback": "".join(traceback.format_exception(e))[-4000:]}


def _free(plan: Plan) -> None:
    import gc

    gc.collect()
    if plan.device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _f(v, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def _psnr(v) -> str:
    return "exact" if v is not None and v >= PSNR_CAP_DB else _f(v, ".1f")


def _met(v) -> str:
    return "–" if v is None else ("**met**" if v else "**not met**")


def markdown(report: dict) -> str:
    s, smoke = report["sections"], report["mode"] == "smoke"
    env = s.get("environment", {})
    m = env.get("machine", {})
    lines = [f"# GPU check ({report['mode']}, {report['started']})", "",
             f"Machine: {env.get('gpu') or m.get('cpu', '?')}; torch {m.get('torch', '?')}, diffusers "
             f"{env.get('diffusers', '?')}, Lightning {env.get('pytorch_lightning', '?')}. "
             f"Total {report.get('elapsed_s', '?')} s.", ""]
    if smoke:
        lines += ["Smoke run (CPU, toy sizes): the same code as on the GPU; the targets are for one H100 / H200 "
                  "in bf16 and are not judged here.", ""]
    lines += ["| section | status | seconds |", "|---|---|---|"]
    lines += [f"| {k} | {v['status']} | {v.get('elapsed_s', '–')} |" for k, v in s.items()]
    t = s.get("pytest_cuda", {})
    if "passed" in t:
        lines += ["", f"`pytest -m cuda`: {t['passed']} passed, {t['failed']} failed, {t['errors']} errors, "
                      f"{t['skipped']} skipped."]
    lines += _md_training(s, smoke) + _md_decode(s.get("decode", {}), smoke)
    problems = [(k, p) for k, v in s.items() for p in v.get("problems", [])]
    problems += [(k, f"{v['error']['type']}: {v['error']['message']}") for k, v in s.items() if "error" in v]
    if problems:
        lines += ["", "## Problems", ""] + [f"- {k}: {p}" for k, p in problems]
    return "\n".join(lines) + "\n"


def _md_training(s: dict, smoke: bool) -> list[str]:
    names = [n for n in ("train_base", "train_large_2x") if s.get(n, {}).get("runs")]
    if not names:
        return []
    lines = ["", "## Training (synthetic data, random frozen encoder and LPIPS trunk)", "",
             "| run | size | batch | images/s before GAN | images/s after GAN | target | peak MB | loss finite |",
             "|---|---|---|---|---|---|---|---|"]
    kinds = set()
    for name in names:
        sec = s[name]
        for label, r in sec["runs"].items():
            if "error" in r:
                lines.append(f"| {name} {label} | {sec['size']}² | | error: {r['error']['type']} | | | | |")
                continue
            kinds.add(r["peak_mem_kind"])
            met = " (GPU)" if smoke else " " + _met((r["img_s_after_gan"] or 0) >= sec["target_img_s"])
            lines.append(f"| {name} {label} | {sec['size']}² | {r['batch']} | {_f(r['img_s_before_gan'], '.1f')} | "
                         f"{_f(r['img_s_after_gan'], '.1f')} | ≥ {sec['target_img_s']:.0f}{met} | "
                         f"{_f(r['peak_mem_mb'], '.0f')} | {'yes' if r['loss_finite'] else '**no**'} |")
        if sec.get("checkpointing_memory_saving_pct") is not None:
            lines.append(f"| {name}: checkpointing saves | | | | | | {sec['checkpointing_memory_saving_pct']:.0f}% | |")
    return lines + (["", f"Peak: {', '.join(sorted(kinds))}. Images/s after warm-up steps (compilation), before "
                         "and after the discriminator starts; the target applies to the latter."] if kinds else [])


def _md_decode(d: dict, smoke: bool) -> list[str]:
    if not d.get("rows"):
        return []
    lines = ["", f"## Decode {d['size']}² (image + mask): ours vs diffusers' eager, same weights", "",
             "| variant | batch | dtype | ours runs | ours ms | diffusers ms | speedup | target | "
             "max abs diff vs fp32 | PSNR dB vs fp32, ours / diffusers |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        head = f"| {r['variant']} | {r['batch']} | {r['dtype']} |"
        if "error" in r:
            lines.append(f"{head} error: {r['error']['type']} | | | | | | |")
            continue
        target = "–"
        if r["dtype"] == "bf16":
            target = f"≥ {r['target_speedup']:.0f}×" + (" (GPU)" if smoke else f" {_met(r['meets_target'])}")
        lines.append(f"{head} {r['ours_switches']} | {_f(r['ours_ms'], '.1f')} | {_f(r['reference_ms'], '.1f')} | "
                     f"{_f(r['speedup'], '.2f')} | {target} | {_f(r['max_abs_diff'], '.2e')} | "
                     f"{_psnr(r['psnr_db'])} / {_psnr(r['reference_psnr_db'])} |")
    return lines


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/gpu_check.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="gpu_check_out", help="folder for gpu_check.json and gpu_check.md")
    p.add_argument("--smoke", action="store_true", help="CPU, toy sizes, seconds: the same code paths (CI)")
    p.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these sections")
    p.add_argument("--skip", nargs="+", choices=SECTIONS, default=[], help="leave these sections out")
    p.add_argument("--no-compile", action="store_true", help="no torch.compile anywhere (faster, not the target setting)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: 1 with --smoke, else torch's)")
    return p.parse_args(argv)


@keeps_torch_threads
def main(argv=None) -> int:
    args = parse_args(argv)
    plan = SMOKE if args.smoke else GPU
    if args.no_compile:
        plan = replace(plan, compile=False)
    threads = args.threads or (1 if args.smoke else None)  # tiny ops on a busy 2-core machine: 1 is fastest
    if threads:
        torch.set_num_threads(threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = lambda s: print(s, flush=True)  # noqa: E731
    report: dict[str, Any] = {
        "mode": "smoke" if args.smoke else "gpu",
        "command": " ".join(["scripts/gpu_check.py"] + (sys.argv[1:] if argv is None else list(argv))),
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "plan": asdict(plan), "targets": TARGETS, "sections": {},
    }
    t0 = time.perf_counter()

    def save():  # what is done survives a crash or a time limit later on
        report["elapsed_s"] = round(time.perf_counter() - t0, 1)
        _write(out, report)

    for name in SECTIONS:
        if (args.only and name not in args.only) or name in args.skip:
            report["sections"][name] = {"status": "skipped"}
            continue
        run_section(report, name, lambda section: SECTION_FNS[name](plan, section, log, save), log)
        _free(plan)
        save()
    report["failed"] = [k for k, v in report["sections"].items() if v["status"] == "failed"]
    report["ok"] = not report["failed"]
    report["elapsed_s"] = round(time.perf_counter() - t0, 1)
    _write(out, report)
    print(markdown(report), flush=True)
    log(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}; "
        + ("all sections ok" if report["ok"] else f"failed: {', '.join(report['failed'])}"))
    return 0 if report["ok"] else 1


def _write(out: Path, report: dict) -> None:
    write_json(out / "gpu_check.json", report)
    try:
        text = markdown(report)
    except Exception as e:  # a table bug must not cost the measurements: the JSON is written already
        text = f"# GPU check\n\nThe table could not be written ({type(e).__name__}: {e}); see gpu_check.json.\n"
    (out / "gpu_check.md").write_text(text)
