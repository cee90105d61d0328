#!/usr/bin/env bash
# The GPU check of issue 12: one command, at most ~8 minutes on one GPU, no network.
#
#   bash benchmarks/gpu_check.sh [DATA_DIR] [OUT_DIR]
#
# DATA_DIR holds cifar10/{train,test}.npz (python3 ../shared/datasets/unpack.py DIR). Without
# it, the script unpacks .gpu-data/ (the copy ../shared/datasets/cifar10-gpu/README.md says
# how to carry to the GPU machine: JPEG-compressed training images, exact test set) into
# /tmp/attnzoo-gpu-data. OUT_DIR (default gpu_check_out) gets every log, the JSON of each
# measurement and summary.md, the one table this prints at the end.
#
# It needs torch, torchvision and timm (the GPU machine has them); attnzoo is installed with
# `pip install -e . --no-deps` if it is not importable; safetensors, tqdm, pyyaml and
# pytest are needed and are on that machine's image or carried as wheels (.wheels/).
#
# Steps: 1. the CUDA tests (pytest -m cuda); 2. attnzoo bench on resnet56 (CIFAR input,
# batch 128) for none se eca cbam ham gam triplet csm, fp32 and bf16, and timm's se/eca/cbam;
# 2b. the gate kernels (Triton) against the PyTorch path (--kernels), training and inference;
# 3. resnet50 at 224 px, batch 64, none se cbam ham; 4. one full CIFAR-10 epoch of resnet20
# and of resnet20 + ham (img/s, loader share); 5. that resnet20 run resumed on the CPU, stopped
# by SIGINT after some steps (it must save a checkpoint that lists both devices);
# 6. summary.md.
#
# DEVICE=cpu QUICK=1 bash benchmarks/gpu_check.sh DATA_DIR OUT is a dry run of the script's
# own logic on a CPU machine (tiny benches, 1,280 training images): it checks the script,
# not the GPU.
set -uo pipefail
device=${DEVICE:-cuda}
quick=${QUICK:-0}
if [ "$quick" = 1 ]; then
    b56="--batch-size 8 --repeats 1 --warmup 1"; b50="--batch-size 2 --repeats 1 --warmup 1"
    subset="--train-subset 1280 --test-subset 512"; steps=10; stop_after=25
else
    b56="--batch-size 128 --repeats 20 --warmup 5"; b50="--batch-size 64 --repeats 10 --warmup 3"
    subset=""; steps=390; stop_after=45
fi
data=${1:-${DATA:-}}
out=${2:-gpu_check_out}
mkdir -p "$out"
log() { echo "== $*" | tee -a "$out/steps.log"; }
status() { echo "$1 exit $2" >> "$out/status.txt"; }
: > "$out/status.txt"

if ! python3 -c "import attnzoo" 2>/dev/null; then
    if [ -d .wheels ]; then pip install -q --no-index --find-links .wheels .wheels/*.whl; fi
    pip install -q -e . --no-deps || { echo "cannot install attnzoo"; exit 1; }
fi
python3 - <<'EOF' | tee "$out/machine.txt"
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
print("gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NONE")
EOF
if [ "$device" != cpu ]; then
    python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
        echo "no CUDA device: this script is for a GPU machine (DEVICE=cpu QUICK=1: dry run)"
        exit 1; }
fi

if [ -z "$data" ]; then
    data=/tmp/attnzoo-gpu-data
    if [ ! -f "$data/cifar10/train.npz" ]; then
        log "unpacking .gpu-data into $data"
        python3 .gpu-data/unpack_gpu.py "$data" > "$out/unpack.log" 2>&1 || {
            echo "cannot unpack .gpu-data (see $out/unpack.log)"; exit 1; }
    fi
fi
[ -f "$data/cifar10/train.npz" ] || { echo "no $data/cifar10/train.npz"; exit 1; }

log "1. CUDA tests"
timeout 240 python3 -m pytest -q -m cuda -p no:cacheprovider tests > "$out/pytest_cuda.log" 2>&1
status pytest_cuda $?
tail -3 "$out/pytest_cuda.log"

log "2. resnet56 bench, CIFAR input, batch 128"
timeout 120 attnzoo bench --device "$device" --model resnet56 $b56 \
    --modes channels_last bf16 --attentions none se eca cbam ham gam triplet csm --timm --json \
    > "$out/bench_resnet56.json" 2> "$out/bench_resnet56.err"
status bench_resnet56 $?

log "2b. the fused gate kernels (Triton) against the PyTorch path, training and inference"
timeout 150 attnzoo bench --device "$device" --model resnet56 $b56 --modes channels_last bf16 \
    --attentions none se eca cbam ham --kernels --json \
    > "$out/bench_kernels.json" 2> "$out/bench_kernels.err"
status bench_kernels $?
timeout 90 attnzoo bench --device "$device" --model resnet56 $b56 --modes channels_last bf16 \
    --attentions none se eca cbam ham --kernels --inference --json \
    > "$out/bench_kernels_inference.json" 2> "$out/bench_kernels_inference.err"
status bench_kernels_inference $?

log "3. resnet50 bench, 224 px, batch 64"
timeout 120 attnzoo bench --device "$device" --model resnet50 --num-classes 1000 --input-size 224 \
    $b50 --modes channels_last bf16 \
    --attentions none se cbam ham --json > "$out/bench_resnet50.json" 2> "$out/bench_resnet50.err"
status bench_resnet50 $?

log "4. one CIFAR-10 epoch: resnet20 and resnet20 + ham"
for att in none ham; do
    rm -rf "$out/r20-$att"
    timeout 150 attnzoo train --device "$device" --model resnet20 --attention "$att" \
        --dataset cifar10 --data-dir "$data" --recipe ham --epochs 1 $subset --no-progress \
        --out "$out/r20-$att" \
        > "$out/train_r20_$att.log" 2>&1
    status "train_r20_$att" $?
    tail -2 "$out/train_r20_$att.log"
done

# The loop does not synchronise, so its loader_time on a GPU is the host's time only; this
# times the loader with its GPU work (synchronised phases), an upper bound of its share.
timeout 120 python3 benchmarks/loader_share.py bf16 "$device" > "$out/loader_share.txt" 2>&1
status loader_share $?

log "5. the resnet20 run resumed on the CPU, stopped by SIGINT"
rm -rf "$out/r20-cpu" && cp -r "$out/r20-none" "$out/r20-cpu" && rm -f "$out/r20-cpu/summary.json"
# One more epoch to train, so that the resume has steps to take (the schedule's length changes;
# this checks the move between devices, not accuracy).
python3 - "$out/r20-cpu/config.yaml" <<'EOF'
import sys, yaml
path = sys.argv[1]
cfg = yaml.safe_load(open(path))
cfg["epochs"] = 2
yaml.safe_dump(cfg, open(path, "w"), sort_keys=False)
EOF
timeout -s INT "$stop_after" attnzoo train --resume "$out/r20-cpu" --device cpu --no-progress \
    > "$out/resume_cpu.log" 2>&1
status resume_cpu $?
python3 - "$out/r20-cpu/checkpoint.pt" "$device" "$steps" <<'EOF' | tee -a "$out/resume_cpu.log"
import sys, torch
state = torch.load(sys.argv[1], weights_only=True)
devices = [d["device"] for d in state["devices"]]
ok = devices[0].startswith(sys.argv[2]) and devices[-1] == "cpu" and state["step"] > int(sys.argv[3])
print(f"checkpoint after the CPU resume: step {state['step']}, devices {devices}:",
      "OK" if ok else "WRONG")
sys.exit(0 if ok else 1)
EOF
status resume_cpu_checkpoint $?

log "6. summary"
python3 - "$out" <<'EOF' | tee "$out/summary.md"
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
print("# GPU check:", " ".join(Path(out, "machine.txt").read_text().split()))
print()
print("| step | exit |")
print("| --- | --- |")
for line in Path(out, "status.txt").read_text().splitlines():
    name, _, code = line.rpartition(" exit ")
    print(f"| {name} | {code} |")


def bench_table(name):
    path = out / name
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        print(f"\n{name}: no result ({e})")
        return
    print(f"\n## {name} ({result['settings'].get('device')}, {result['settings'].get('timing')})\n")
    print(f"Gates: {result['settings'].get('gates')}; step: {result['settings'].get('step')}\n")
    print("| attention | impl | mode | step ms | img/s | vs plain | ours / timm | kernels / off |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in result["rows"]:
        timm = r.get("ours_over_timm")
        ab = r.get("kernels_over_off")
        print(
            f"| {r['attention']} | {r.get('impl', 'ours')} | {r['mode']} | {r['step_ms']:.2f} | "
            f"{r['images_per_s']:.0f} | {r['vs_plain']:.3f}x | "
            f"{'' if timm is None else f'{timm:.3f}x'} | {'' if ab is None else f'{ab:.3f}x'} |"
        )


bench_table("bench_resnet56.json")
bench_table("bench_kernels.json")
bench_table("bench_kernels_inference.json")
bench_table("bench_resnet50.json")
print("\n## One CIFAR-10 epoch (recipe ham, batch 128)\n")
print("| model | img/s | epoch s | loader share | test err % | 200-epoch projection |")
print("| --- | --- | --- | --- | --- | --- |")
for att in ("none", "ham"):
    try:
        row = [json.loads(l) for l in (out / f"r20-{att}" / "metrics.jsonl").read_text().splitlines()][0]
    except (OSError, ValueError, IndexError) as e:
        print(f"| resnet20 + {att} | no result ({e}) | | | | |")
        continue
    share = row["loader_time"] / max(row["train_time"], 1e-9)
    print(
        f"| resnet20 + {att} | {row['images_per_s']:.0f} | {row['epoch_time']:.2f} | "
        f"{100 * share:.1f}% | {row['test_top1_err']:.2f} | {200 * row['epoch_time'] / 60:.1f} min |"
    )
print("\n(loader share above: host time of next(batch), the loop does not synchronise; the")
print("first epoch includes cudnn.benchmark's search.) Loader with its GPU work, synchronised:\n")
try:
    print("```\n" + (out / "loader_share.txt").read_text().strip() + "\n```")
except OSError as e:
    print(f"no loader_share.txt ({e})")
EOF
echo "wrote $out/summary.md"
