"""The option values the attacks accept, without torch: the params schema (:mod:`pipelines.config`) checks
``params.yaml`` against them before any model code loads."""

PRECISIONS = ("fp32", "bf16", "auto")  # attacks.precision: an attack gradient's numeric policy (auto: per device)
BOUNDS = ("image", "channel")  # attacks.sglrp: z^B bounds from each image's min/max, or per channel from 0 and 1
RELU = ("channel", "sum")  # attacks.sglrp: ReLU of the map per colour channel before summing, or after
INACTIVE_POOL = ("spread", "drop")  # attacks.sglrp: a global pool's all-zero channel: relevance spread or dropped
