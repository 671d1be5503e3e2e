"""What the ``reproducible`` switch costs: training steps and AoA steps with the machine's own kernels vs pinned
AVX2 kernels, each in its own process (the kernels are chosen once per process), side by side in one run:

    python benchmarks/bench_reproducible.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def one(pinned: bool, threads: int, repeats: int) -> dict:
    from pipelines.reproducible import pin_cpu

    if pinned:
        pin_cpu(threads)
    import timm
    import torch

    from attacks import AttackConfig, create_attack
    from model_zoo.zoo import build_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = timm.create_model("resnet10t", num_classes=10)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.rand(64, 3, 32, 32), torch.randint(0, 10, (64,))

    def train_step():
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()

    surrogate = build_model({"name": "vgg_demo", "arch": "vgg_demo", "num_classes": 10})
    aoa = create_attack("aoa", surrogate, AttackConfig(si=2))
    xa, ya = torch.rand(16, 3, 32, 32), torch.randint(0, 10, (16,))

    def aoa_step():
        aoa.gradient(xa, ya, torch.Generator().manual_seed(0))

    out = {"kernels": torch.backends.cpu.get_cpu_capability()}
    for name, step in (("train_step_ms", train_step), ("aoa_step_ms", aoa_step)):
        step()  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            step()
        out[name] = 1000 * (time.perf_counter() - start) / repeats
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--one", choices=["machine", "pinned"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one == "pinned", args.threads, args.repeats)))
        return
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR")}
    rows = {}
    for mode in ("machine", "pinned"):
        run = subprocess.run([sys.executable, __file__, "--one", mode, "--threads", str(args.threads), "--repeats",
                              str(args.repeats)], env=env, capture_output=True, text=True, check=True)
        rows[mode] = json.loads(run.stdout.strip().splitlines()[-1])
        print(f"{mode:>8} kernels ({rows[mode]['kernels']}): resnet10t train step {rows[mode]['train_step_ms']:.1f} ms, "
              f"AoA step (vgg_demo, 16 images, SI 2) {rows[mode]['aoa_step_ms']:.1f} ms")
    for key in ("train_step_ms", "aoa_step_ms"):
        print(f"pinned / machine {key.removesuffix('_ms').replace('_', ' ')} time: "
              f"{rows['pinned'][key] / rows['machine'][key]:.2f}")


if __name__ == "__main__":
    main()
