"""BSR (Wang et al., "Boosting adversarial transferability by block shuffle and rotation", CVPR 2024).

The gradient is the mean over ``copies`` transformed images: each copy cuts the image into ``blocks`` strips of
random widths along one axis (the axis drawn at random) and each strip into ``blocks`` pieces of random heights
along the other, shuffles the strips and the pieces within each strip, and turns every piece about its centre by an
angle drawn from [-max_angle, max_angle] degrees (bilinear, zero fill). One layout per copy for the whole batch, as
TransferAttack's code draws it. With momentum (mu = 1). Settings: 20 copies and 3 blocks (TransferAttack's
defaults), rotations within 24 degrees (the paper's range; TransferAttack's current code only shuffles).
"""

from __future__ import annotations

import torch
import torchvision.transforms.functional as TF
from torchvision.transforms import InterpolationMode

from attacks.fgsm_family import CrossEntropyAttack
from attacks.registry import register_attack


def random_lengths(total: int, parts: int, gen: torch.Generator) -> list[int]:
    """``parts`` positive lengths summing to ``total``, in random proportions."""
    shares = torch.rand(parts, generator=gen, dtype=torch.float64) + 1e-3
    lengths = torch.round(shares / shares.sum() * total).long().clamp(min=1)
    lengths[lengths.argmax()] += total - int(lengths.sum())
    return lengths.tolist()


@register_attack("bsr", mi=1.0)
class BSR(CrossEntropyAttack):
    copies = 20
    blocks = 3
    max_angle = 24.0

    @property
    def copies_per_image(self) -> int:
        return self.copies

    def input_copies(self, x: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return x.repeat(self.copies, 1, 1, 1), torch.full((self.copies,), 1 / self.copies, dtype=torch.float64)

    def copy_transform(self, x: torch.Tensor, copies: int, gen: torch.Generator):
        """Copy k's own block layout and angles on its rows (BSR takes the place of DI)."""
        layouts = [self.draw_layout(*x.shape[-2:], gen) for _ in range(copies)]

        def transform(part: torch.Tensor, start: int) -> torch.Tensor:
            rows = torch.arange(start, start + len(part)) // len(x)  # the copy each row belongs to
            return torch.cat([self.apply_layout(part[rows == k], layouts[k]) for k in rows.unique().tolist()])

        return transform

    def draw_layout(self, h: int, w: int, gen: torch.Generator) -> dict:
        """The random parts of one copy: which axis is cut first, the cuts, the two shuffles and the angles."""
        first = 2 if torch.rand(1, generator=gen).item() < 0.5 else 3
        outer = random_lengths(h if first == 2 else w, self.blocks, gen)
        inner = [random_lengths(w if first == 2 else h, self.blocks, gen) for _ in range(self.blocks)]
        return {"first": first, "outer": outer, "inner": inner,
                "outer_order": torch.randperm(self.blocks, generator=gen).tolist(),
                "inner_order": [torch.randperm(self.blocks, generator=gen).tolist() for _ in range(self.blocks)],
                "angles": ((torch.rand(self.blocks, self.blocks, generator=gen) * 2 - 1) * self.max_angle).tolist()}

    def apply_layout(self, x: torch.Tensor, layout: dict) -> torch.Tensor:
        first = layout["first"]
        second = 5 - first  # the other spatial axis
        strips = x.split(layout["outer"], dim=first)
        rows = []
        for s in layout["outer_order"]:
            pieces = strips[s].split(layout["inner"][s], dim=second)
            rows.append(torch.cat([self.rotate(pieces[p], layout["angles"][s][p]) for p in layout["inner_order"][s]],
                                  dim=second))
        return torch.cat(rows, dim=first)

    def rotate(self, block: torch.Tensor, angle: float) -> torch.Tensor:
        return TF.rotate(block, angle, interpolation=InterpolationMode.BILINEAR) if angle else block
