"""The machine's speed, printed beside a benchmark's figures: fp32 matmul GFLOP/s on 2 threads (the README's
"GFLOP/s (2-thread fp32 matmul)"), so that figures from machines of different speed can be compared."""

from __future__ import annotations

import os
import time


def matmul_gflops(threads: int = 2, n: int = 2048, seconds: float = 2.0) -> float:
    """fp32 GFLOP/s of square ``n`` x ``n`` matmuls on ``threads`` torch threads, over about ``seconds`` after a
    warm-up; torch's thread count is put back after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        c = torch.empty(n, n)
        for _ in range(2):
            torch.mm(a, b, out=c)
        reps, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds:
            torch.mm(a, b, out=c)
            reps += 1
        return 2 * n ** 3 * reps / elapsed / 1e9
    finally:
        torch.set_num_threads(before)


def calibration_line(threads: int = 2) -> str:
    """The matmul figure, and the 1-minute load average before it (other work on the machine slows every figure)."""
    load = os.getloadavg()[0]
    return f"calibration: {matmul_gflops(threads):.0f} GFLOP/s ({threads}-thread fp32 matmul); load average {load:.2f}"


if __name__ == "__main__":
    print(calibration_line())
