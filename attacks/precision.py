"""Numeric precision policies for attack gradients (``AttackConfig.precision``).

- ``fp32``: IEEE fp32 everywhere; on a GPU TF32 is switched off for convolutions and matmuls while the attack's
  gradient is computed. The default, and the faithful policy for AoA.
- ``bf16``: the objective and its gradient under bf16 autocast. Fine for the sign-step cross-entropy baselines,
  whose step keeps only the sign of the gradient; not for AoA.
- ``auto``: bf16 where the device computes it natively (a CUDA GPU that supports it), fp32 otherwise. The CPUs this
  project runs on (AMD EPYC, AVX2 or AVX-512 without bf16 units) emulate bf16: a VGG19 PGD step at 224 px took
  about 5x longer in bf16 than in fp32. :func:`resolve_precision` decides, once the device is known; the shards'
  records name the policy that ran.

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

from attacks.options import PRECISIONS


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


def resolve_precision(policy: str, device: str | torch.device) -> str:
    """``policy`` on ``device``: ``auto`` becomes bf16 on a CUDA device with native bf16, fp32 elsewhere."""
    if policy != "auto":
        return policy
    device = torch.device(device)
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False) else "fp32"


def forward_precision(policy: str, device_type: str):
    """The context for an attack's objective and its gradient under ``policy`` (resolved: fp32 or bf16)."""
    if policy not in PRECISIONS or policy == "auto":
        raise ValueError(f"precision {policy!r} is not a policy to run: fp32 or bf16 (resolve auto first)")
    if policy == "fp32":
        return _ieee_fp32(device_type)
    return torch.autocast(device_type, dtype=torch.bfloat16)
