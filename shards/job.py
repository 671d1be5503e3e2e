"""The generate stage's unit of work: one clean shard, attacked into one adversarial shard.

A :class:`ShardJob` is built by the generate flow and run by :func:`shards.adversarial.attack_shard_file` on any
worker (a thread, a Dask process). Its digest covers everything that decides the shard's bytes and nothing about
where it runs, so a rerun keeps a finished shard exactly when it would make the same bytes again.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

from attacks import AttackConfig, code_digest
from attacks.registry import attack_builder
from common.budget import Budget
from model_zoo.spec import ModelSpec


@dataclass(frozen=True)
class ShardJob:
    in_shard: str
    out_shard: str
    in_sha256: str  # the clean shard's checksum: a re-prepared clean shard is another job
    method: str  # the attack (a registry name)
    config: AttackConfig  # the budget on [0,1] and the options every attack shares
    attack_options: dict[str, Any]  # options of the method's own constructor (AoA's SGLRP conventions)
    budget: Budget  # as the parameters give it (0-255): repeated in every record
    surrogate: ModelSpec
    surrogate_sha256: str | None  # its weights: other weights, another job
    batch_size: int
    seed: int
    # where the job runs, not what it makes (no part of the digest):
    sub_batch: int | Literal["auto"] = 0  # image copies per pass; auto: sized for the device (attacks.memory)
    workers_per_device: int = 1  # workers sharing the device, for auto
    recorded_sha256: str | None = None  # the output's checksum in the set's SHA256SUMS, if an earlier run made it

    @property
    def name(self) -> str:
        return Path(self.out_shard).stem  # e.g. aoa-000003

    def digest(self, precision: str, sub_batch: int) -> str:
        """Everything that decides the shard's bytes: the clean shard's checksum, the attack and its config with
        the precision policy and the copies per pass as resolved on the device, the budget, the surrogate and its
        weights' sha256, batching, seed, and the attack code (it holds each method's presets; a changed attack
        remakes shards a rerun would keep)."""
        config = replace(self.config, precision=precision, sub_batch=sub_batch)
        job = {"in_sha256": self.in_sha256, "attack": self.method, "config": asdict(config),
               "attack_kwargs": self.attack_options, "budget": self.budget.model_dump(),
               "surrogate": self.surrogate.to_json(), "surrogate_sha256": self.surrogate_sha256,
               "batch_size": self.batch_size, "seed": self.seed, "attack_code": code_digest()}
        return hashlib.sha256(json.dumps(job, sort_keys=True).encode()).hexdigest()[:16]


def constructor_options(method: str) -> set[str]:
    """The options a method's registered class takes in its constructor, beyond the shared :class:`AttackConfig`
    (read from its signature, so it never drifts from the code)."""
    parameters = inspect.signature(attack_builder(method).cls.__init__).parameters.values()
    return {p.name for p in parameters if p.kind is p.KEYWORD_ONLY or (
        p.kind is p.POSITIONAL_OR_KEYWORD and p.name not in ("self", "model", "config"))}


def split_options(set_name: str, method: str, budget: Budget,
                  options: dict[str, Any]) -> tuple[AttackConfig, dict[str, Any]]:
    """An attack set's options as (the shared config under the budget, the method's constructor options); an
    option that is neither is an error naming the set."""
    own = constructor_options(method)
    shared = set(AttackConfig.__dataclass_fields__) - {"eta", "eps", "alpha", "max_steps", "sub_batch"}
    unknown = set(options) - own - shared
    if unknown:
        raise ValueError(f"attacks.{set_name}: {', '.join(sorted(unknown))} is not an option of {method} (its own: "
                         f"{', '.join(sorted(own)) or 'none'}; shared: {', '.join(sorted(shared))})")
    config = AttackConfig(eta=budget.eta / 255, eps=budget.eps / 255, alpha=budget.alpha / 255,
                          max_steps=budget.max_steps, **{k: v for k, v in options.items() if k in shared})
    return config, {k: v for k, v in options.items() if k in own}
