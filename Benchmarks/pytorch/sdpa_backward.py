#!/usr/bin/env python3
"""PyTorch's CPU scaled_dot_product_attention, forward and backward, timed the way
attention-bench times the library (issue 18's comparison; KernelDocs/Dense.md, "Backward").

Not part of the package or of CI: run it by hand with a CPU build of PyTorch, e.g.

    python3 -m venv /tmp/torchenv
    /tmp/torchenv/bin/pip install torch --index-url https://download.pytorch.org/whl/cpu
    /tmp/torchenv/bin/python Benchmarks/pytorch/sdpa_backward.py --seq 2048 --heads 8 --dim 64 --threads 2

FLOPs follow the harness: forward 2 * pairs * (D + Dv), backward 2.5x that (pairs = N^2, or
N(N+1)/2 causal). Inputs are Float32 uniform in [-1, 1], B = 1; `dO` is seeded like the
inputs. Each pass is timed `--repeat` times after one warm-up call; median and minimum.
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def timed(call, repeat):
    call()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--causal", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n, h, d = args.seq, args.heads, args.dim
    shape = (1, h, n, d)
    q, k, v = [(torch.rand(shape) * 2 - 1).requires_grad_() for _ in range(3)]
    grad = torch.rand(shape) * 2 - 1
    pairs = n * (n + 1) // 2 if args.causal else n * n
    forward_flops = 2.0 * h * pairs * (d + d)
    backward_flops = 2.5 * forward_flops

    def forward():
        with torch.no_grad():
            F.scaled_dot_product_attention(q, k, v, is_causal=args.causal)

    out = F.scaled_dot_product_attention(q, k, v, is_causal=args.causal)

    def backward():
        # The gradients alone, given the forward's graph (kept between calls).
        torch.autograd.grad(out, (q, k, v), grad, retain_graph=True)

    def both():
        o = F.scaled_dot_product_attention(q, k, v, is_causal=args.causal)
        torch.autograd.grad(o, (q, k, v), grad)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, B=1 H={h} N={n} D={d} "
          f"causal={args.causal}")
    for name, call, flops in [("forward", forward, forward_flops), ("backward", backward, backward_flops),
                              ("forward+backward", both, forward_flops + backward_flops)]:
        median, minimum = timed(call, args.repeat)
        print(f"{name:17s} median {median * 1e3:8.3f} ms  min {minimum * 1e3:8.3f} ms  "
              f"{flops / median / 1e9:7.1f} GFLOP/s (median)")


if __name__ == "__main__":
    main()
