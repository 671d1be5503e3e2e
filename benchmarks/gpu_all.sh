#!/usr/bin/env bash
# The GPU benchmark set, run in one go on a GPU machine (see README "Benchmarks").
set -u
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)"
# AoA under its faithful policy (fp32, TF32 off); PGD in fp32 and in bf16 (its sign step tolerates bf16)
for pgd in fp32 bf16; do
  python3 benchmarks/bench_attack_step.py --arch vgg19 --size 224 --batch 64 --device cuda --pgd-precision $pgd --repeats 5
done
python3 benchmarks/bench_attack_step.py --arch resnet50 --size 224 --batch 64 --device cuda --repeats 5
python3 benchmarks/bench_attack_step.py --arch tf_efficientnet_lite0 --size 224 --batch 64 --device cuda --repeats 5
python3 benchmarks/bench_generate.py --images 512 --shard-size 128 --batch 64 --device cuda
python3 benchmarks/bench_eval.py --arch resnet50 --images 4096 --size 224 --batch 256 --workers 8 --shard-size 512 --device cuda
