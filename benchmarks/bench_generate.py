"""End-to-end generation throughput with DAmageNet settings: clean shards in, AoA shards out.

    python benchmarks/bench_generate.py --images 512 --device cuda

VGG19 surrogate with random weights (speed does not depend on them), 224 px, the authors' SI (x counted twice), eta=7,
eps=25.5, alpha=2 (0-255 scale), AoA's faithful fp32 precision policy by default. Source images are procedural demo-world images rendered at 224 px. Prints images/s end to end
(shard reading, attack, PNG encoding and shard writing included) and mean steps per image. The 50,000-image
ImageNet val set in under an hour needs >= 14 images/s.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from attacks.precision import PRECISIONS
from common.budget import Budget
from model_zoo.spec import ModelSpec
from shards.adversarial import attack_shard_file
from shards.job import ShardJob, split_options
from shards.shardset import shard_name, write_shard
from sources.demo_world import CLASSES, render


def make_clean_shards(root: Path, images: int, size: int, shard_size: int) -> list[Path]:
    paths = []
    for s in range(0, images, shard_size):
        samples = []
        for i in range(s, min(images, s + shard_size)):
            c = i % len(CLASSES)
            samples.append({"key": f"img{i:06d}", "image": render(CLASSES[c], size, np.random.default_rng(i)),
                            "cls": c, "json": {"key": f"img{i:06d}", "label": c}})
        paths.append(root / shard_name("clean", s // shard_size))
        write_shard(paths[-1], samples)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--shard-size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--arch", default="vgg19")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", choices=list(PRECISIONS), default="fp32")
    ap.add_argument("--max-steps", type=int, default=50)
    args = ap.parse_args()
    torch.backends.cudnn.benchmark = True
    budget = Budget(eta=7.0, eps=25.5, alpha=2.0, max_steps=args.max_steps)
    config, _ = split_options("aoa", "aoa", budget, {"si": 4, "si_x_twice": True, "precision": args.precision})
    spec = ModelSpec(name=args.arch, arch=args.arch, data={"input_size": [3, args.size, args.size]})
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        clean = make_clean_shards(tmp, args.images, args.size, args.shard_size)
        jobs = [ShardJob(in_shard=str(p), out_shard=str(tmp / shard_name("aoa", i)), in_sha256="", method="aoa",
                         config=config, attack_options={}, budget=budget, surrogate=spec, surrogate_sha256=None,
                         batch_size=args.batch, seed=0) for i, p in enumerate(clean)]
        warm = replace(jobs[0], out_shard=str(tmp / "warmup.tar"), config=replace(config, max_steps=2))
        attack_shard_file(warm, args.device)  # model build, cuDNN autotuning
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        steps = sum(attack_shard_file(job, args.device)["steps"] for job in jobs)
        wall = time.perf_counter() - start
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"device: {name}; {args.arch} {args.size}px batch {args.batch} {args.precision}, SI=4 (x twice), "
          f"eta=7 eps=25.5 alpha=2 (0-255)")
    print(f"end to end: {args.images} images in {wall:.1f} s = {args.images / wall:.2f} img/s; "
          f"mean steps/image {steps / args.images:.2f}; 50,000 images would take {50000 / (args.images / wall) / 3600:.2f} h")


if __name__ == "__main__":
    main()
