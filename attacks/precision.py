"""Numeric precision policies for attack gradients (``AttackConfig.precision``).

- ``fp32``: IEEE fp32 everywhere; on a GPU TF32 is switched off for convolutions and matmuls while the attack's
  gradient is computed. The default, and the faithful policy for AoA.
- ``bf16``: the objective and its gradient under bf16 autocast. Fine for the sign-step cross-entropy baselines,
  whose step keeps only the sign of the gradient; not for AoA.

Why AoA needs fp32: the heat map ``h = ReLU(A_t - A_d * sum(A_t) / sum(A_d))`` is a small difference of two large
maps (well under 1% of ``||A_t||`` on a trained net), so rounding errors in either map are amplified by two to three
orders of magnitude. Measured with :func:`attacks.aoa.policy_error` against fp64 on the demo VGG (32 px, CPU
autocast): fp32 maps within 1e-4 and gradient cosine 1.0000; bf16 activations with an fp32 relevance pass 44% map
error, cosine 0.67; everything in bf16 383%, cosine 0.59. Keeping only the relevance pass in fp32 is therefore not
enough, and TF32 (3 more mantissa bits than bf16) is switched off too. The tests and
``benchmarks/bench_attack_step.py`` report :func:`attacks.aoa.policy_error`.
"""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("fp32", "bf16")


@contextlib.contextmanager
def _ieee_fp32(device_type: str):
    """No TF32 on CUDA inside the block (backward kernels read the flags too, so the gradient belongs inside)."""
    if device_type != "cuda":
        yield
        return
    conv, matmul = torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision
    torch.backends.cudnn.conv.fp32_precision = torch.backends.cuda.matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision = conv, matmul


def forward_precision(policy: str, device_type: str):
    """The context for an attack's objective and its gradient under ``policy``."""
    if policy not in PRECISIONS:
        raise ValueError(f"unknown precision {policy!r}; one of {PRECISIONS}")
    if policy == "fp32":
        return _ieee_fp32(device_type)
    return torch.autocast(device_type, dtype=torch.bfloat16)
