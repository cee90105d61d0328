#!/usr/bin/env bash
# The CPU-budget re-runs whose reports are in docs/results/ (see docs/results/README.md).
# Each reproduce call is seed-major (seeds 1, then 2, then 3: finished runs are skipped), so
# a cut-short session still has every row at the same number of seeds. Two streams ran side
# by side, one thread each, on the 2-core machine:
#   bash benchmarks/cpu_reproduce.sh ham  DATA_DIR   # HAM Table 4 ResNet-20 rows (CIFAR-10, CIFAR-100)
#   bash benchmarks/cpu_reproduce.sh csm  DATA_DIR   # seed 000 ablation on ResNet-20 (CIFAR-10)
# then:  bash benchmarks/cpu_reproduce.sh report
set -euo pipefail
what=${1:?ham, csm or report}
data=${2:-${ATTNZOO_DATA:-$HOME/.cache/attnzoo}}
case "$what" in
ham)
  for k in 1 2 3; do
    attnzoo reproduce ham_table4 --rows 1 2 3 4 6 --dataset cifar10 --seeds $k --epochs 3 \
      --train-subset 10000 --threads 1 --data-dir "$data" --out runs/cpu-c10
    attnzoo reproduce ham_table4 --rows 1 6 --dataset cifar100 --seeds $k --epochs 3 \
      --train-subset 10000 --threads 1 --data-dir "$data" --out runs/cpu-c100
  done ;;
csm)
  for k in 1 2 3; do
    attnzoo reproduce csm_table1 --model resnet20 --recipe ham --dataset cifar10 --seeds $k \
      --epochs 3 --train-subset 2500 --test-subset 2000 --threads 1 --data-dir "$data" \
      --out runs/cpu-abl
  done ;;
report)
  attnzoo report ham_table4 --out runs/cpu-c10
  attnzoo report ham_table4 --out runs/cpu-c100
  attnzoo report csm_table1 --out runs/cpu-abl ;;
*) echo "unknown step $what: ham, csm or report" >&2; exit 2 ;;
esac
