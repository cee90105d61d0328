#!/usr/bin/env bash
# modern_cifar against ham on CIFAR-10 at a short, equal budget (issue 15): resnet20, no
# attention, EPOCHS epochs, seeds 0 and 1, the two recipes side by side on the 2 cores (one
# thread each). modern_cifar's 5 warm-up epochs of 200 are scaled to the budget.
#   bash benchmarks/modern_vs_ham.sh DATA_DIR OUT [EPOCHS]
set -euo pipefail
data=${1:?data dir (python3 ../shared/datasets/unpack.py DIR)}
out=${2:?output dir}
epochs=${3:-15}
warmup=$(python3 -c "print(5 / 200 * $epochs)")
for seed in 0 1; do
    attnzoo train --model resnet20 --dataset cifar10 --data-dir "$data" --recipe ham \
        --epochs "$epochs" --seed "$seed" --threads 1 --out "$out/ham-s$seed" &
    attnzoo train --model resnet20 --dataset cifar10 --data-dir "$data" --recipe modern_cifar \
        --epochs "$epochs" --warmup-epochs "$warmup" --seed "$seed" --threads 1 \
        --out "$out/modern_cifar-s$seed" &
    wait
done
