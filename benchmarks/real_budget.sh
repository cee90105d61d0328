#!/usr/bin/env bash
# HAM Table 4's ResNet-20 rows on CIFAR-10 (plain, SE, ECA, CBAM, HAM) at a budget where the
# numbers mean something on a 2-core CPU (issue 16): the full training and test sets, 20
# epochs of the `cosine` recipe (the HAM recipe's SGD, lr 0.1, batch 128, weight decay 5e-4,
# with a cosine decay instead of the step drops), 3 seeds, two cells at a time (one thread
# each), bf16 autocast where the CPU has bf16 instructions (precision auto).
#
#   bash benchmarks/real_budget.sh DATA_DIR OUT [REPORT_DIR]
#
# Seed-major order: every row at seed 0, then seed 1, then seed 2. Stopped (Ctrl-C, a session
# ending), the same command continues from the run directories; finished runs are skipped.
# The report (Markdown and plots) goes to REPORT_DIR (default docs/results/ham_table4_cifar10_20ep).
set -euo pipefail
data=${1:?data dir (python3 ../shared/datasets/unpack.py DIR)}
out=${2:?output root for the runs}
report=${3:-docs/results/ham_table4_cifar10_20ep}
status=0
attnzoo reproduce ham_table4 --rows 1 2 3 4 6 --dataset cifar10 --data-dir "$data" --seeds 3 \
    --recipe cosine --epochs 20 --jobs 2 --out "$out" || status=$?
# The report covers the runs that finished, also after an interruption.
mkdir -p "$report"
attnzoo report ham_table4 --out "$out" --markdown "$report/report.md"
exit "$status"
