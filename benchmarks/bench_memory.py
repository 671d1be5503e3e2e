"""Peak memory and time of one AoA gradient (the authors' SI: x, x, x/2, x/4, x/8) with and without sub-batching,
and the measured bytes of one image copy over the model's forward activation bytes (``attacks.memory``'s factor).

Each setting runs in its own process, so each peak RSS is that setting's own:

    python benchmarks/bench_memory.py --arch vgg19 --size 224 --batch 2 --sub-batch 0 2 1
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def one(arch: str, size: int, batch: int, sub_batch: int, threads: int) -> dict:
    import torch

    from attacks import AttackConfig, create_attack
    from attacks.memory import activation_bytes, auto_sub_batch
    from model_zoo.zoo import build_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model({"name": arch, "arch": arch, "num_classes": 1000})
    attack = create_attack("aoa", model, AttackConfig(si=4, si_x_twice=True, sub_batch=sub_batch))
    x, y = torch.rand(batch, 3, size, size), torch.randint(0, 1000, (batch,))
    activations = activation_bytes(model, size)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1e3  # Linux: kB
    start = time.perf_counter()
    attack.gradient(x, y, torch.Generator().manual_seed(0))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1e3
    copies = min(sub_batch or 4 * batch, 4 * batch)  # copies held by one pass
    return {"seconds": time.perf_counter() - start, "peak_rss_gb": peak / 1e9,
            # what attacks.memory assumes: a copy costs memory_factor x the forward activations
            "bytes_per_copy_over_activations": round((peak - before) / copies / activations, 2),
            "auto_sub_batch_1_worker": auto_sub_batch(attack, size, "cpu", 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="vgg19")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--sub-batch", type=int, nargs="+", default=[0, 2], help="0: the whole batch (4 copies each)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.arch, args.size, args.batch, args.sub_batch[0], args.threads)))
        return
    print(f"AoA gradient, {args.arch} {args.size} px, batch {args.batch} x 4 SI passes, {args.threads} threads (CPU)")
    rows = {}
    for sb in args.sub_batch:
        out = subprocess.run([sys.executable, __file__, "--one", "--arch", args.arch, "--size", str(args.size),
                              "--batch", str(args.batch), "--sub-batch", str(sb), "--threads", str(args.threads)],
                             capture_output=True, text=True, check=True)
        rows[sb] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"sub_batch {sb or 'off':>4}: peak RSS {rows[sb]['peak_rss_gb']:6.2f} GB, {rows[sb]['seconds']:7.1f} s, "
              f"a copy = {rows[sb]['bytes_per_copy_over_activations']:.1f}x the forward activations "
              f"(attacks.memory assumes 10)")
    print(f"sub_batch auto on this machine, one worker: {rows[sb]['auto_sub_batch_1_worker']} copies per pass")
    base = rows[args.sub_batch[0]]
    for sb in args.sub_batch[1:]:
        print(f"ratio sub_batch {sb} / {args.sub_batch[0] or 'off'}: memory {rows[sb]['peak_rss_gb'] / base['peak_rss_gb']:.2f}, "
              f"time {rows[sb]['seconds'] / base['seconds']:.2f}")


if __name__ == "__main__":
    main()
