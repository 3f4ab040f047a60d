"""Benchmarks and the one-shot GPU check: tools around `ldm_asym`, not part of it.

    harness.py    same-weights models (ours vs diffusers), inputs, timing, output difference,
                  training step, peak memory: one configuration at a time (`run_config`)
    data.py       data-loading throughput per DataLoader worker
    cli.py        scripts/benchmark.py's command line and tables
    train_run.py  a short Lightning training run from a config dict, timed around the GAN start
    gpu_check.py  scripts/gpu_check.py: CUDA tests, training and decode figures in one JSON + table
    tiled_memory.py  CPU peak memory and time of tiled vs untiled decoding (own command line)
    tiled_accuracy.py  tiled vs untiled PSNR, time and FLOPs per GroupNorm statistics mode (own command line)

Importable from the repo root (the scripts put it on sys.path); docs/benchmarks.md has the numbers.
"""
