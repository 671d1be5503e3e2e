"""Time one attack step (objective gradient + update direction) for AoA fast, AoA reference and PGD, side by side.

    python benchmarks/bench_attack_step.py                       # CPU, demo surrogate, 32 px
    python benchmarks/bench_attack_step.py --arch vgg19 --size 224 --batch 64 --device cuda
    python benchmarks/bench_attack_step.py --arch vgg19 --size 224 --batch 64 --device cuda --pgd-precision bf16

Random weights (speed does not depend on them). SI is off here so that one step is one gradient for every
attack; with SI on, AoA and SI baselines cost the same multiple. AoA runs under its faithful precision policy
(``--precision``, default fp32: see attacks.precision), and the script prints that policy's heat-map error and
gradient cosine against fp64 on the same batch; PGD runs under ``--pgd-precision``. Prints images/s per method and
the ratios AoA-fast/PGD and AoA-fast/AoA-reference (throughput ratios: higher is better for AoA).
"""

from __future__ import annotations

import argparse
import time

import torch

from attacks import AttackConfig, create_attack
from attacks.precision import PRECISIONS, policy_error
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
    for name, s in seconds.items():
        print(f"{name:14s} {s * 1000:9.1f} ms/step  {args.batch / s:9.1f} img/s")
    print(f"ratio aoa-fast/pgd throughput: {seconds['pgd'] / seconds['aoa-fast']:.3f}")
    if "aoa-reference" in seconds:
        print(f"ratio aoa-fast/aoa-reference throughput: {seconds['aoa-reference'] / seconds['aoa-fast']:.3f}")


if __name__ == "__main__":
    main()
