"""Time one attack step (objective gradient + update direction) for AoA fast, AoA reference and PGD, side by side.

    python benchmarks/bench_attack_step.py                       # CPU, demo surrogate, 32 px
    python benchmarks/bench_attack_step.py --arch vgg19 --size 224 --batch 64 --device cuda
    python benchmarks/bench_attack_step.py --arch vgg19 --size 224 --batch 64 --device cuda --pgd-precision bf16

Random weights (speed does not depend on them). SI is off here so that one step is one gradient for every
attack; with SI on, AoA and SI baselines cost the same multiple. AoA runs under its faithful precision policy
(``--precision``, default fp32: see attacks.precision), and the script prints that policy's heat-map error and
gradient cosine against fp64 on the same batch; PGD runs under ``--pgd-precision``. Prints images/s per method and
the ratios AoA-fast/PGD and AoA-fast/AoA-reference (throughput ratios: higher is better for AoA).

Next to each measured ratio it prints the ratio the step's counts allow, counted from the model on one image
(not by hand): FLOPs (torch's flop-counter formulas: convolutions and matrix products, forward and backward) and bytes
written by every operator (a lower bound on memory traffic). A path at its limit has the measured ratio equal to
the counted one; a gap is overhead the counts do not need.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry

from attacks import AttackConfig, create_attack
from attacks.aoa import policy_error
from attacks.precision import PRECISIONS
from model_zoo.converters import efficientnet_lite_state_dict
from model_zoo.zoo import ModelSpec, build_model


def time_step(attack, x, y, warmup: int, repeats: int) -> float:
    gen = torch.Generator().manual_seed(0)
    for _ in range(warmup):
        attack.gradient(x, y, gen)
    if x.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        attack.gradient(x, y, gen)
    if x.is_cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


class StepCounter(TorchDispatchMode):
    """FLOPs of every operator torch's flop counter knows (convolutions, matrix products, their backward) and bytes
    of every tensor an operator writes (views write nothing: a lower bound on memory traffic). A dispatch mode of
    its own: FlopCounterMode's module hooks refuse the ``autograd.grad`` calls an attack step makes."""

    def __init__(self):
        super().__init__()
        self.flops = self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func._overloadpacket in flop_registry:
            self.flops += flop_registry[func._overloadpacket](*args, **kwargs, out_val=out)
        if not func.is_view:
            self.bytes += sum(t.numel() * t.element_size() for t in tree_leaves(out) if isinstance(t, torch.Tensor))
        return out


def step_counts(attack, x, y) -> dict[str, int]:
    """FLOPs and bytes written by one attack step (objective gradient and update direction) on ``x``."""
    with StepCounter() as counter:
        attack.gradient(x, y, torch.Generator().manual_seed(0))
    return {"flops": counter.flops, "bytes": counter.bytes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="vgg_demo")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--num-classes", type=int, default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", choices=list(PRECISIONS), default="fp32", help="AoA's policy")
    ap.add_argument("--pgd-precision", choices=list(PRECISIONS), default="fp32")
    ap.add_argument("--pretrained-lite", action="store_true",
                    help="load the pip-installed ImageNet weights (tf_efficientnet_lite0/1/2 only)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-reference", action="store_true", help="skip the slow double-backward path")
    args = ap.parse_args()
    torch.backends.cudnn.benchmark = True
    num_classes = args.num_classes or (10 if args.arch == "vgg_demo" else 1000)
    model = build_model(ModelSpec(name=args.arch, arch=args.arch, num_classes=num_classes,
                                  data={"input_size": (3, args.size, args.size)}), device=args.device)
    if args.pretrained_lite:
        model.model.load_state_dict(efficientnet_lite_state_dict(args.arch, model.model))
    torch.manual_seed(0)
    x = torch.rand(args.batch, 3, args.size, args.size, device=args.device)
    y = torch.randint(0, num_classes, (args.batch,), device=args.device)
    cfg = AttackConfig(si=1, precision=args.precision)
    methods = {"aoa-fast": create_attack("aoa", model, cfg),
               "pgd": create_attack("pgd", model, cfg, precision=args.pgd_precision)}
    if not args.skip_reference:
        methods["aoa-reference"] = create_attack("aoa", model, cfg, explicit=False)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device: {device_name}; model {args.arch} {args.size}px batch {args.batch}; "
          f"AoA {args.precision}, PGD {args.pgd_precision}")
    err = policy_error(model, x[:4], y[:4], args.precision)
    print(f"AoA {args.precision} policy vs fp64 (4 images): heat-map L1 error {err['map_rel_error']:.2e}, "
          f"gradient cosine {err['grad_cosine']:.6f}")
    seconds = {name: time_step(a, x, y, warmup=2, repeats=args.repeats) for name, a in methods.items()}
    counts = {name: step_counts(a, x[:1], y[:1]) for name, a in methods.items()}
    for name, s in seconds.items():
        c = counts[name]
        print(f"{name:14s} {s * 1000:9.1f} ms/step  {args.batch / s:9.1f} img/s   per image: "
              f"{c['flops'] / 1e9:8.2f} GFLOP, {c['bytes'] / 2**20:9.1f} MiB written")

    def ratio(fast: str, slow: str) -> str:
        return (f"measured {seconds[slow] / seconds[fast]:.3f}; counts allow {counts[slow]['flops'] / counts[fast]['flops']:.3f}"
                f" (FLOPs), {counts[slow]['bytes'] / counts[fast]['bytes']:.3f} (bytes)")

    print(f"ratio aoa-fast/pgd throughput: {ratio('aoa-fast', 'pgd')}")
    if "aoa-reference" in seconds:
        print(f"ratio aoa-fast/aoa-reference throughput: {ratio('aoa-fast', 'aoa-reference')}")


if __name__ == "__main__":
    main()
