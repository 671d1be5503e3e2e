"""The ``reproducible`` switch: the same float bytes whatever kernel level an x86-64 CPU with AVX2 offers.

On a CPU the bytes of a training run or an attack depend on which vector kernels run: ATen picks its kernel level
(default / AVX2 / AVX-512) from the CPU, oneDNN (convolutions) its instruction set, MKL (matrix products) its code
path, and reductions split their work by the intra-op thread count. Each changes the last bits of some results, and
a few SGD steps carry those bits into every weight. The switch pins all four to what every such machine has. It must
act before the process runs its first tensor operation: all three libraries read their setting once, lazily.
Measured, it is not enough across different machines (two CPUs trained the demo zoo to different weights): what else
differs is not pinned by any setting these libraries offer; the README says what reproduces where.
"""

from __future__ import annotations

import os

PINNED_ENV = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_CBWR": "AVX2,STRICT",  # MKL's conditional numerical reproducibility: one code path, strict mode
}


class NotReproducibleHere(RuntimeError):
    pass


def pin_cpu(threads: int | None) -> None:
    """Pin kernels and ``threads`` intra-op threads for this process and the processes it starts (the params'
    ``reproducible.threads``; None leaves the machine's fastest kernels and its thread count)."""
    if threads is None:
        return
    os.environ.update(PINNED_ENV)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)
    level = torch.backends.cpu.get_cpu_capability()
    if level != "AVX2":
        raise NotReproducibleHere(
            f"reproducible: ATen runs {level} kernels, not AVX2 (the CPU lacks AVX2, or a tensor operation ran before "
            "the switch could act); set reproducible: null to run with this machine's kernels")
