"""The attack-step benchmark's counts (benchmarks/bench_attack_step.py) agree with torch's own flop counter."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from model_zoo.zoo import ModelSpec, build_model


def _bench():
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_attack_step.py"
    spec = importlib.util.spec_from_file_location("bench_attack_step", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_step_counter_counts_what_torchs_flop_counter_counts_and_the_bytes_of_the_outputs():
    bench = _bench()
    torch.manual_seed(0)
    model = build_model(ModelSpec(name="v", arch="vgg_demo", num_classes=10))
    x = torch.rand(2, 3, 32, 32, requires_grad=True)

    def step():
        model(x).logsumexp(1).sum().backward()

    with FlopCounterMode(display=False) as reference:
        step()
    with bench.StepCounter() as counter:
        step()
    assert counter.flops == reference.get_total_flops() > 0
    with bench.StepCounter() as written:
        torch.zeros(3, 5).add(1).view(15).t()  # zeros and add write 15 floats each; view and t write nothing
    assert written.bytes == 2 * 15 * 4
