"""Evaluation input pipeline: one timm model reading shards vs the same model on tensors already in memory.

    python benchmarks/bench_eval.py --arch resnet50 --images 4096 --device cuda --workers 8

Prints both throughputs and their ratio (target >= 0.9: reading and decoding shards keeps the GPU fed).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from evaluators.classification import evaluate_shardset, shard_loader
from model_zoo.zoo import build_model
from shards.shardset import shard_name, write_shard


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="resnet10t")
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--shard-size", type=int, default=256)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--channels-last", action="store_true")
    args = ap.parse_args()
    torch.backends.cudnn.benchmark = True
    model = build_model({"name": args.arch, "arch": args.arch, "num_classes": 1000,
                         "data": {"input_size": [3, args.size, args.size]}}, device=args.device)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for s in range(0, args.images, args.shard_size):
            n = min(args.shard_size, args.images - s)
            # smooth random images compress like photos, unlike white noise
            base = rng.integers(0, 256, (n, args.size // 8, args.size // 8, 3), dtype=np.uint8)
            imgs = base.repeat(8, axis=1).repeat(8, axis=2)
            write_shard(root / shard_name("bench", s // args.shard_size),
                        [{"key": f"k{s + i:07d}", "image": imgs[i], "cls": i % 1000, "json": {}} for i in range(n)])
        x_mem = torch.rand(args.batch, 3, args.size, args.size, device=args.device)
        batches = args.images // args.batch

        def sync():
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()

        with torch.no_grad():
            for _ in range(3):
                model(x_mem)
            sync()
            t = time.perf_counter()
            for _ in range(batches):
                model(x_mem)
            sync()
            mem_rate = batches * args.batch / (time.perf_counter() - t)
        evaluate_shardset(model, root, args.batch, args.device, args.workers)  # warm-up (workers, cuDNN)
        sync()
        t = time.perf_counter()
        evaluate_shardset(model, root, args.batch, args.device, args.workers)
        sync()
        shard_rate = args.images / (time.perf_counter() - t)
        t = time.perf_counter()
        n = sum(len(b[1]) for b in shard_loader(root, args.batch, args.workers))
        read_rate = n / (time.perf_counter() - t)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"device: {name}; {args.arch} {args.size}px batch {args.batch}, {args.workers} reader workers")
    print(f"forward on in-memory tensors: {mem_rate:9.1f} img/s")
    print(f"evaluate from shards:         {shard_rate:9.1f} img/s")
    print(f"shard reading+decoding alone: {read_rate:9.1f} img/s")
    print(f"ratio shards/in-memory: {shard_rate / mem_rate:.3f}")


if __name__ == "__main__":
    main()
