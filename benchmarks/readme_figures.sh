#!/usr/bin/env bash
# Re-measures every figure of the README's "Measured" table, and the bf16-vs-fp32 learning
# check of docs/performance.md, on this machine; prints the CPU first. Run it alone on the
# machine (timings are side by side within each bench, but a busy machine still shifts them):
#   bash benchmarks/readme_figures.sh DATA_DIR [OUT]     # about 40 min on 2 cores
# DATA_DIR holds cifar10/{train,test}.npz (python3 ../shared/datasets/unpack.py DATA_DIR).
set -euo pipefail
data=${1:?DATA_DIR with cifar10/}
out=${2:-runs/readme}
mkdir -p "$out"
python - <<'EOF'
from attnzoo.utils.machine import describe_machine
print("machine:", describe_machine())
EOF

# 1. The main job (the README's first command), with the precision `auto` picks and in fp32.
for p in auto fp32; do
  attnzoo train --model resnet20 --attention ham --dataset digits --recipe digits \
    --precision $p --no-progress --out "$out/digits-ham-$p"
done

# 2. One epoch of CIFAR-10, plain and with HAM (precision auto), and the loader's share.
for a in none ham; do
  attnzoo train --model resnet20 --attention $a --dataset cifar10 --data-dir "$data" \
    --epochs 1 --no-progress --out "$out/c10-1ep-$a"
done

# 3. Step-time benches: layouts and bf16; attention overhead; ours vs timm; FLOP/s.
attnzoo bench --model resnet20 --attentions none ham --modes eager channels_last bf16
attnzoo bench --model resnet56 --attentions none se cbam ham --modes channels_last bf16 --repeats 5
attnzoo bench --model resnet56 --threads 1 --attentions none se eca cbam ham triplet
attnzoo bench --model resnet56 --threads 1 --attentions none se eca cbam --timm
attnzoo bench --efficiency --model resnet20 --threads 1

# 4. Does bf16 learn as well as fp32? digits (full recipe) and a short CIFAR-10 run, 2 seeds.
for s in 0 1; do
  for p in fp32 bf16; do
    attnzoo train --model resnet20 --attention ham --dataset digits --recipe digits \
      --precision $p --seed $s --no-progress --out "$out/learn-digits-$p-s$s"
    attnzoo train --model resnet20 --attention ham --dataset cifar10 --data-dir "$data" \
      --epochs 3 --train-subset 10000 --precision $p --seed $s --no-progress \
      --out "$out/learn-c10-$p-s$s"
  done
done
python - "$out" <<'EOF'
import json, sys
from pathlib import Path
for summary in sorted(Path(sys.argv[1]).glob("*/summary.json")):
    s = json.loads(summary.read_text())
    print(f"{summary.parent.name}: test error {s['final_top1_err']:.2f}% "
          f"({s['precision']}), {s['wall_time']:.1f} s, loader share {s['loader_share']:.2%}")
EOF
