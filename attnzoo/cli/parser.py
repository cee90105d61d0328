"""The command line's argument parser: every command and option of ``attnzoo``."""

from __future__ import annotations

import argparse

import yaml

from ..train.fastpath import PRECISIONS

EXIT_USAGE = 2
COMPILE_FLAGS = {"auto": "auto", "on": True, "off": False}  # --compile -> TrainConfig.compile
DEVICE_HELP = "auto (default: CUDA when available, else the CPU), cpu, cuda or cuda:N"


def parse_mapping(option: str, text: str | None) -> dict | None:
    """Parse --attention-kwargs / --model-kwargs: a JSON or YAML mapping, e.g. '{"reduction": 8}'."""
    if text is None:
        return None
    try:
        value = yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError) as e:  # RecursionError: absurdly deep nesting
        shown = text if len(text) <= 80 else text[:77] + "..."
        raise ValueError(f"{option}: not a JSON/YAML mapping: {shown!r}") from e
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        shown = text if len(text) <= 80 else text[:77] + "..."
        raise ValueError(f"{option}: expected a mapping like '{{\"reduction\": 8}}', got {shown!r}")
    return value


def parse_overrides(items: list[str] | None) -> dict:
    """``--set key=value`` items as a mapping; each value is read as YAML (``0.1``, ``true``,
    ``[0.5, 0.75]``, ``null``)."""
    values: dict = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set takes KEY=VALUE, e.g. --set warmup_epochs=0; got {item!r}")
        if key in values:
            raise ValueError(f"--set {key} given twice")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except (yaml.YAMLError, RecursionError) as e:
            raise ValueError(f"--set {key}: cannot read {text!r} as a value") from e
        if isinstance(value, str):  # YAML 1.1 reads 5e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        values[key] = value
    return values


def add_training_option_flags(t: argparse.ArgumentParser) -> None:
    """``train`` flags of the modern training options (docs/training.md); all default off."""
    o = t.add_argument_group("modern training options (docs/training.md)")
    o.add_argument("--optimizer", choices=["sgd", "adamw"], help="default sgd")
    o.add_argument("--betas", type=float, nargs=2, metavar="B", help="adamw: e.g. 0.9 0.999")
    o.add_argument("--label-smoothing", type=float, metavar="F", help="e.g. 0.1 (default 0)")
    o.add_argument("--mixup-alpha", type=float, metavar="A", help="mixup Beta alpha (0: off)")
    o.add_argument("--cutmix-alpha", type=float, metavar="A", help="CutMix Beta alpha (0: off)")
    o.add_argument("--mix-prob", type=float, metavar="P", help="probability a batch is mixed")
    o.add_argument(
        "--mix-switch-prob", type=float, metavar="P", help="with both: probability of CutMix"
    )
    o.add_argument("--ema-decay", type=float, metavar="D", help="weight EMA, e.g. 0.999 (0: off)")
    o.add_argument(
        "--auto-augment",
        choices=["none", "trivialaugment", "randaugment"],
        help="per-image policy (in-memory datasets)",
    )
    o.add_argument("--rand-augment-ops", type=int, metavar="N", help="randaugment: ops per image")
    o.add_argument("--rand-augment-magnitude", type=int, metavar="M", help="randaugment: bin 0..30")
    o.add_argument(
        "--random-erasing", type=float, metavar="P", help="probability of erasing a box per image"
    )


def table_names() -> str:
    """The paper tables ``reproduce`` and ``report`` know (the specs' names; no torch import)."""
    from ..experiments.spec import list_tables

    return ", ".join(list_tables())


# --device of profile and bench (train, eval and visualize have their own).
MEASURE_DEVICE_HELP = (
    "where to measure: auto (default: CUDA when available, else the CPU), cpu, cuda or cuda:N"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attnzoo", description="Attention-augmented CNNs: train, evaluate, list."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model (or --resume a run)")
    t.add_argument("--model", help="model name (see `attnzoo list`), default resnet20")
    t.add_argument("--attention", help="attention module name, or 'none'")
    t.add_argument(
        "--attention-kwargs",
        help="module options, e.g. '{\"separation_rate\": 0.5}'",
    )
    t.add_argument("--model-kwargs", help='model options, e.g. \'{"shortcut": "B"}\'')
    t.add_argument("--dataset", help="dataset name (see `attnzoo list`), default cifar10")
    t.add_argument("--data-dir", help="data root (default: $ATTNZOO_DATA or ~/.cache/attnzoo)")
    t.add_argument("--recipe", default=None, help="recipe name or YAML path (default: ham)")
    t.add_argument("--epochs", type=int)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--weight-decay", type=float)
    t.add_argument("--momentum", type=float)
    t.add_argument(
        "--nesterov", action=argparse.BooleanOptionalAction, default=None, help="Nesterov SGD"
    )
    t.add_argument("--schedule", help="multistep, cosine or constant")
    t.add_argument(
        "--milestones",
        type=float,
        nargs="+",
        metavar="F",
        help="multistep: lr drops at these fractions of the run, e.g. 0.3 0.6 0.8",
    )
    t.add_argument("--gamma", type=float, help="multistep: factor of each lr drop")
    t.add_argument(
        "--warmup-epochs",
        type=float,
        help="linear lr warmup (a recipe's warmup that does not fit a shorter run is scaled)",
    )
    t.add_argument("--seed", type=int)
    t.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    t.add_argument("--train-subset", type=int, help="train on the first N images only")
    t.add_argument("--test-subset", type=int, help="evaluate on the first N test images only")
    t.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="channels_last memory format (default on: faster on this CPU)",
    )
    t.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="tqdm progress bar (default: only on a terminal)",
    )
    t.add_argument(
        "--checkpoint-every-steps",
        type=int,
        metavar="N",
        help="also save a checkpoint every N steps (resume continues inside the epoch)",
    )
    t.add_argument(
        "--sync-bn",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="with several processes: batch-norm statistics over the global batch",
    )
    t.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="folder datasets (imagenet): image-decoding processes (default min(4, cores))",
    )
    t.add_argument(
        "--image-size",
        type=int,
        metavar="S",
        help="folder datasets (imagenet): crop side (default 224; val resizes to S*256/224)",
    )
    t.add_argument(
        "--compile",
        choices=sorted(COMPILE_FLAGS),
        help="torch.compile the training step: auto (default: only if the run is long enough "
        "to repay compiling), on or off",
    )
    t.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="autocast of the forward pass: auto (default: bf16 on GPUs that support it and "
        "on CPUs with bf16 instructions, else fp32), fp32, bf16, fp16 (CUDA only: with a "
        "gradient scaler)",
    )
    t.add_argument(
        "--device",
        help=f"{DEVICE_HELP}; with --resume, continue the run there",
    )
    t.add_argument(
        "--deterministic",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="CUDA: bitwise repeatable kernels (no cudnn.benchmark), at some speed",
    )
    t.add_argument(
        "--log",
        action="extend",
        nargs="+",
        metavar="NAME",
        help="also log every epoch to: tensorboard (RUN_DIR/tensorboard; needs "
        "pip install 'attnzoo[tensorboard]')",
    )
    t.add_argument(
        "--log-figures-every",
        type=int,
        metavar="N",
        help="--log tensorboard: Grad-CAM and attention-map figures every N epochs and at the "
        "end (default 10; 0: none)",
    )
    add_training_option_flags(t)
    t.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        dest="overrides",
        help="set any config key (see a run's config.yaml), e.g. --set warmup_epochs=0; "
        "the value is read as YAML; repeatable",
    )
    t.add_argument(
        "--out", help="run directory (default runs/<model>-<attention>-<dataset>-s<seed>)"
    )
    t.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR")
    t.add_argument(
        "--nproc",
        type=int,
        metavar="K",
        help="train with K data-parallel processes (relaunches through torch.distributed.run)",
    )

    e = sub.add_parser("eval", help="re-evaluate a run's saved weights on its test set")
    e.add_argument("--run", required=True, help="run directory")
    e.add_argument("--data-dir", help="data root, if not the one the run used")
    e.add_argument("--json", action="store_true", help="print JSON")
    e.add_argument(
        "--ema", action="store_true", help="the weight EMA's weights (runs with ema_decay)"
    )
    e.add_argument("--device", default="auto", help=DEVICE_HELP)

    pr = sub.add_parser(
        "profile",
        help="parameters, MACs/FLOPs, memory and latency, with and without the attention",
    )
    pr.add_argument("--model", required=True, help="model name (see `attnzoo list`)")
    pr.add_argument("--attention", help="attention name, or 'none'")
    pr.add_argument("--attention-kwargs", help="attention options, a JSON/YAML mapping")
    pr.add_argument("--model-kwargs", help='model options, e.g. \'{"placement": "stage"}\'')
    pr.add_argument("--num-classes", type=int, default=10)
    pr.add_argument("--input-size", type=int, default=32, help="square input side (default 32)")
    pr.add_argument("--batch-size", type=int, default=128, help="for memory and latency")
    pr.add_argument("--repeats", type=int, default=10, help="timed steps (median)")
    pr.add_argument("--threads", type=int, help="torch threads (default: all cores; not on CUDA)")
    pr.add_argument("--device", default="auto", help=MEASURE_DEVICE_HELP)
    pr.add_argument("--no-timing", action="store_true", help="skip the latency measurement")
    pr.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    pr.add_argument("--json", action="store_true", help="print JSON")

    b = sub.add_parser("bench", help="training-step time of a model with each attention")
    b.add_argument("--model", help="model name (default resnet56; resnet20 with --sweep)")
    b.add_argument("--attentions", nargs="+", help="default: none se eca cbam ham")
    b.add_argument(
        "--modes",
        nargs="+",
        default=["channels_last"],
        help="eager, channels_last, bf16, compiled (default channels_last)",
    )
    b.add_argument("--model-kwargs", help="model options, a JSON/YAML mapping")
    b.add_argument("--num-classes", type=int, default=10)
    b.add_argument("--input-size", type=int, default=32)
    b.add_argument("--batch-size", type=int, default=128)
    b.add_argument("--repeats", type=int, help="timed steps per case (default 10; sweep 2)")
    b.add_argument("--warmup", type=int, help="untimed steps per case (default 2; sweep 1)")
    b.add_argument("--threads", type=int, help="torch threads (default: all cores; not on CUDA)")
    b.add_argument("--device", default="auto", help=MEASURE_DEVICE_HELP)
    b.add_argument("--json", action="store_true", help="print JSON")
    b.add_argument("--timm", action="store_true", help="also time timm's se/eca/cbam, same weights")
    b.add_argument(
        "--kernels",
        action="store_true",
        help="also time each attention with the fused gate kernels off (ATTNZOO_KERNELS=off)",
    )
    b.add_argument(
        "--inference", action="store_true", help="time an eval-mode forward without grad"
    )
    b.add_argument("--efficiency", action="store_true", help="achieved FLOP/s vs fp32 matmul")
    b.add_argument("--matmul-size", type=int, default=2048, help="n of the n x n reference mm")
    b.add_argument("--sweep", action="store_true", help="step time over batch and input sizes")
    b.add_argument("--batch-sizes", nargs="+", type=int, default=[8, 32], help="sweep batches")
    b.add_argument("--input-sizes", nargs="+", type=int, default=[32, 64, 96, 224])
    b.add_argument("--max-step-s", type=float, default=30.0, help="sweep: skip predicted-slower")
    b.add_argument(
        "--memory-gib",
        type=float,
        default=8.0,
        help="sweep: memory cap per size (CPU; on CUDA the GPU's memory is the limit)",
    )
    b.add_argument("--plot", metavar="PNG", help="sweep: write ratio vs H*W to this file")

    rp = sub.add_parser(
        "reproduce", help="train the rows of a paper table, several seeds (restartable)"
    )
    rp.add_argument("table", help=f"paper table, one of: {table_names()} (attnzoo list tables)")
    rp.add_argument(
        "--rows", nargs="+", metavar="R", help="rows by slug, name or number (default: all)"
    )
    rp.add_argument("--epochs", type=int, help="epochs of every run (instead of the recipe's)")
    rp.add_argument(
        "--budget", type=float, metavar="F", help="fraction of each recipe's epochs, e.g. 0.05"
    )
    rp.add_argument("--seeds", type=int, default=1, metavar="K", help="seeds 0..K-1 (default 1)")
    rp.add_argument("--dataset", help="run every row on this dataset instead of the row's")
    rp.add_argument("--data-dir", help="data root (default: $ATTNZOO_DATA or ~/.cache/attnzoo)")
    rp.add_argument("--out", default="runs/reproduce", help="output root (default runs/reproduce)")
    rp.add_argument("--train-subset", type=int, metavar="N", help="first N training images only")
    rp.add_argument("--test-subset", type=int, metavar="N", help="first N test images only")
    rp.add_argument("--model", help="run every row on this model instead of the row's")
    rp.add_argument("--recipe", help="train every row with this recipe instead of the row's")
    rp.add_argument(
        "--threads", type=int, help="torch threads per run (default: the cores / --jobs)"
    )
    rp.add_argument(
        "--jobs",
        type=int,
        default=1,
        metavar="K",
        help="run K cells (row x seed) at a time, each in its own process (default 1)",
    )
    rp.add_argument(
        "--devices",
        metavar="LIST",
        help="where the cells train: one device for all (auto, cpu, cuda, cuda:N), or a "
        "comma-separated list the --jobs are spread over in turn, e.g. cuda:0,cuda:1 "
        "(default auto)",
    )
    rp.add_argument(
        "--launcher",
        choices=["slurm", "local"],
        help="submit every cell as a job through submitit: slurm (a job array; returns at once) "
        "or local (the same jobs as local processes); needs pip install submitit",
    )
    rp.add_argument("--slurm-partition", help="Slurm partition")
    rp.add_argument("--slurm-account", help="Slurm account")
    rp.add_argument("--slurm-gpus", type=int, default=0, help="GPUs per job (default 0)")
    rp.add_argument("--slurm-cpus", type=int, help="CPUs per job")
    rp.add_argument("--slurm-mem-gb", type=float, help="memory per job, GiB")
    rp.add_argument(
        "--slurm-time", type=int, default=24 * 60, metavar="MIN", help="time limit per job"
    )
    rp.add_argument("--slurm-parallel", type=int, help="most array jobs running at once")
    rp.add_argument("--slurm-folder", help="submitit's logs (default <out>/<table>/slurm)")

    rr = sub.add_parser("report", help="Markdown table and plots of a table's finished runs")
    rr.add_argument("table", help=f"paper table, as given to `attnzoo reproduce`: {table_names()}")
    rr.add_argument("--out", default="runs/reproduce", help="reproduce's output root")
    rr.add_argument("--markdown", metavar="FILE", help="default <out>/<table>/report.md")

    vz = sub.add_parser(
        "visualize", help="Grad-CAM, attention maps, channel weights and curves of trained runs"
    )
    vz.add_argument(
        "--run",
        action="extend",
        nargs="+",
        required=True,
        metavar="DIR",
        help="run directory; repeat (or list several) to compare runs side by side",
    )
    vz.add_argument(
        "--images", type=int, required=True, metavar="N", help="test images to show, one row each"
    )
    vz.add_argument("--out", help="output directory (default <first run>/viz)")
    vz.add_argument("--data-dir", help="data root, if not the one the runs used")
    vz.add_argument("--seed", type=int, default=0, help="seed of the choice of test images")
    vz.add_argument("--method", default="gradcam", help="gradcam (default) or gradcam++")
    vz.add_argument(
        "--cam-class", default="true", help="class Grad-CAM explains: true (default) or predicted"
    )
    vz.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    vz.add_argument("--device", default="auto", help=DEVICE_HELP)

    ex = sub.add_parser(
        "export",
        help="write a finished run as a Hugging Face Hub model directory (weights, config, card)",
    )
    ex.add_argument("run_dir", metavar="RUN_DIR", help="a finished run directory")
    ex.add_argument(
        "out_dir",
        metavar="OUT_DIR",
        help="new directory: model.safetensors, config.json and README.md (docs/pretrained.md)",
    )
    ex.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")

    ls = sub.add_parser("list", help="list models, attentions, datasets and recipes")
    ls.add_argument(
        "what", nargs="?", choices=["models", "attentions", "datasets", "recipes", "tables"]
    )
    return parser
