"""How many image copies one forward/backward pass of an attack may hold: ``generate.sub_batch: auto``.

An attack's memory grows with the copies per pass (images x SI copies): one copy costs about ``memory_factor`` times
the activation bytes of one forward pass of the model at that resolution. The factors are measured
(``benchmarks/bench_memory.py``, peak RSS of one gradient, fixed costs counted in, so they err high): AoA keeps the
forward activations, the relevance pass (three starts an image) and the gradient through it: 12.0x for VGG19 at
224 px, one copy per pass (``bench_memory.py --arch vgg19 --size 224 --batch 1 --sub-batch 1``; 15.7x when the pass
had four starts); a cross-entropy gradient (the FGSM family) about 3x.

``auto`` gives each concurrent worker an equal share of half the device's *total* memory, not of what happens to be
free: the number of copies per pass decides the last bits of a gradient (other kernels run), so it must come out the
same on every run of one machine, as the shards' bytes must. What is free now is only checked, with a warning.
On CPU the total is the RAM this process may use: the container's cgroup limit where one is set, since the
machine's physical RAM (what a container sees in ``sysconf``) can be twice that and would size a pass, and warn
about it, for memory the process never gets.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

SHARE = 0.5  # of the device's total memory, split among the workers that run on it at once
CGROUP_ROOT = Path("/sys/fs/cgroup")  # a container's own cgroup (cgroup namespaces): v2 memory.max, v1 limit file


def activation_bytes(model: torch.nn.Module, size: int, device: str | torch.device = "cpu") -> int:
    """Bytes of every leaf module's output for one ``3 x size x size`` image (deterministic: shapes, not timings)."""
    total = 0

    def count(_module, _inputs, out):
        nonlocal total
        total += out.numel() * out.element_size() if torch.is_tensor(out) else 0

    leaves = [m for m in model.modules() if not list(m.children())]
    hooks = [m.register_forward_hook(count) for m in leaves]
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size, device=device))
    finally:
        for h in hooks:
            h.remove()
    return total


def total_memory(device: str | torch.device) -> int:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return min([os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), *cgroup_memory_limit()])


def cgroup_memory_limit() -> list[int]:
    """The memory limit of this process's cgroup, in bytes (v2 or v1), or nothing where none is set."""
    for name in ("memory.max", "memory/memory.limit_in_bytes"):
        try:
            value = (CGROUP_ROOT / name).read_text().strip()
        except OSError:
            continue
        return [int(value)] if value.isdigit() else []  # "max" (v2): no limit; v1 says so with a huge number
    return []


def free_memory(device: str | torch.device) -> int:
    """Free GPU memory, or the kernel's ``MemAvailable`` (free RAM plus what it can reclaim) on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024


def copy_bytes(attack, size: int, device: str | torch.device) -> int:
    """Estimated peak bytes of one image copy in one gradient pass of ``attack``."""
    return int(attack.memory_factor * activation_bytes(attack.model, size, device))


def auto_sub_batch(attack, size: int, device: str | torch.device, workers: int) -> int:
    """Copies per pass for one of ``workers`` concurrent workers on ``device`` (at least 1)."""
    return max(1, int(SHARE * total_memory(device) / max(workers, 1) // copy_bytes(attack, size, device)))


def warn_if_short(attack, size: int, device: str | torch.device, copies: int, workers: int) -> None:
    """Warn (not resize: see above) when ``workers`` passes of ``copies`` copies need more than is free now."""
    need, free = copies * max(workers, 1) * copy_bytes(attack, size, device), free_memory(device)
    if need > free:
        warnings.warn(f"{max(workers, 1)} worker(s) x {copies} image copies per pass need about {need / 2**30:.1f} GiB "
                      f"on {device}; {free / 2**30:.1f} GiB is free now: if it runs out of memory, set "
                      f"generate.sub_batch lower", RuntimeWarning, stacklevel=2)
