"""FT: fine-tune on the remaining data only (catastrophic forgetting of the forget set, no explicit signal)."""

from __future__ import annotations

from training.unlearning.base import UnlearningMethod


class FineTune(UnlearningMethod):
    name = "ft"

    def unlearn(self, model, data):
        self.fine_tune(model, *data.remain)
