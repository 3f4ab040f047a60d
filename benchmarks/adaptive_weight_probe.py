"""What the GAN's adaptive weight costs under torch.compile (issue 10, point 7).

The adaptive weight takes the gradients of the reconstruction and GAN losses w.r.t. the decoder's
last conv weight (`autograd.grad(loss, conv_out.weight)`), twice per step once the GAN is on. With
the whole decoder compiled into one graph, each of those runs the whole decoder's backward; with
the output conv left eager (`AsymmetricDecoder.compile_features`, what training uses) it runs only
that conv's weight gradient. This times both against one full backward, on the CPU.

    python -m benchmarks.adaptive_weight_probe --size 64 --batch 2 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ldm_asym.models import AsymmetricDecoder


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up (compiles on the first call)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def probe(mode: str, widths: list[int], size: int, batch: int, repeats: int) -> dict:
    torch.manual_seed(0)
    dec = AsymmetricDecoder(up_widths=widths, resnets_per_level=2, norm_num_groups=min(32, widths[-1] // 2))
    if mode == "whole":
        dec.compile()
    elif mode == "features":
        dec.compile_features()
    z = torch.randn(batch, 4, size // 8, size // 8)
    x = torch.rand(batch, 3, size, size) * 2 - 1
    m = (torch.rand(batch, 1, size, size) > 0.5).float()

    def grad_last_layer():
        out = dec(z, x, m)
        torch.autograd.grad(out.abs().sum(), dec.conv_out.weight)

    def full_backward():
        out = dec(z, x, m)
        out.abs().sum().backward()
        dec.zero_grad(set_to_none=True)

    def forward_only():
        dec(z, x, m)

    fwd = _median_ms(forward_only, repeats)
    last = _median_ms(grad_last_layer, repeats) - fwd
    full = _median_ms(full_backward, repeats) - fwd
    return {"mode": mode, "forward_ms": fwd, "grad_last_layer_ms": last, "full_backward_ms": full,
            "ratio": last / full}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--widths", type=int, nargs=4, default=[256, 256, 128, 64], help="up widths, coarse -> fine")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    torch._functorch.config.donated_buffer = False  # as training sets it
    print(f"| compiled region | forward ms | grad wrt conv_out.weight ms | full backward ms | ratio |\n|---|---|---|---|---|")
    for mode in ("eager", "whole", "features"):
        torch._dynamo.reset()
        r = probe(mode, args.widths, args.size, args.batch, args.repeats)
        print(f"| {mode} | {r['forward_ms']:.1f} | {r['grad_last_layer_ms']:.1f} | {r['full_backward_ms']:.1f} "
              f"| {r['ratio']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
