"""Time one attack step (objective gradient + update direction) for AoA fast, AoA reference and PGD, side by side.

    python benchmarks/bench_attack_step.py                       # CPU, demo surrogate, 32 px
    python benchmarks/bench_attack_step.py --arch vgg19 --size 224 --batch 64 --device cuda --dtype bf16

Random weights (speed does not depend on them). SI is off here so that one step is one gradient for every
attack; with SI on, AoA and SI baselines cost the same multiple. Prints images/s per method and the ratios
AoA-fast/PGD and AoA-fast/AoA-reference (throughput ratios: higher is better for AoA).
"""

from __future__ import annotations

import argparse
import time

import torch

from attacks import AttackConfig, create_attack
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="vgg_demo")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--num-classes", type=int, default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-reference", action="store_true", help="skip the slow double-backward path")
    args = ap.parse_args()
    torch.backends.cudnn.benchmark = True
    num_classes = args.num_classes or (10 if args.arch == "vgg_demo" else 1000)
    model = build_model(ModelSpec(name=args.arch, arch=args.arch, num_classes=num_classes,
                                  data={"input_size": (3, args.size, args.size)}), device=args.device)
    torch.manual_seed(0)
    x = torch.rand(args.batch, 3, args.size, args.size, device=args.device)
    y = torch.randint(0, num_classes, (args.batch,), device=args.device)
    cfg = AttackConfig(si=1, bf16=args.dtype == "bf16")
    methods = {"aoa-fast": create_attack("aoa", model, cfg), "pgd": create_attack("pgd", model, cfg)}
    if not args.skip_reference:
        methods["aoa-reference"] = create_attack("aoa", model, cfg, explicit=False)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device: {device_name}; model {args.arch} {args.size}px batch {args.batch} {args.dtype}")
    seconds = {name: time_step(a, x, y, warmup=2, repeats=args.repeats) for name, a in methods.items()}
    for name, s in seconds.items():
        print(f"{name:14s} {s * 1000:9.1f} ms/step  {args.batch / s:9.1f} img/s")
    print(f"ratio aoa-fast/pgd throughput: {seconds['pgd'] / seconds['aoa-fast']:.3f}")
    if "aoa-reference" in seconds:
        print(f"ratio aoa-fast/aoa-reference throughput: {seconds['aoa-reference'] / seconds['aoa-fast']:.3f}")


if __name__ == "__main__":
    main()
