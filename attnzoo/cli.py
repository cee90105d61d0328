"""Command line: ``attnzoo train | eval | profile | bench | reproduce | report | visualize |
list`` (also ``python -m attnzoo``).

The CLI only parses arguments and calls library functions. Every user error (unknown
name, bad option, missing or corrupt file) prints one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

EXIT_USAGE = 2
COMPILE_FLAGS = {"auto": "auto", "on": True, "off": False}  # --compile -> TrainConfig.compile


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
    t.add_argument("--schedule", help="multistep, cosine or constant")
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
    pr.add_argument("--threads", type=int, help="torch threads (default: all cores)")
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
    b.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    b.add_argument("--json", action="store_true", help="print JSON")
    b.add_argument("--timm", action="store_true", help="also time timm's se/eca/cbam, same weights")
    b.add_argument("--efficiency", action="store_true", help="achieved FLOP/s vs fp32 matmul")
    b.add_argument("--matmul-size", type=int, default=2048, help="n of the n x n reference mm")
    b.add_argument("--sweep", action="store_true", help="step time over batch and input sizes")
    b.add_argument("--batch-sizes", nargs="+", type=int, default=[8, 32], help="sweep batches")
    b.add_argument("--input-sizes", nargs="+", type=int, default=[32, 64, 96, 224])
    b.add_argument("--max-step-s", type=float, default=30.0, help="sweep: skip predicted-slower")
    b.add_argument("--memory-gib", type=float, default=8.0, help="sweep: memory cap per size")
    b.add_argument("--plot", metavar="PNG", help="sweep: write ratio vs H*W to this file")

    rp = sub.add_parser(
        "reproduce", help="train the rows of a paper table, several seeds (restartable)"
    )
    rp.add_argument("table", help="table name: a file in attnzoo/experiments/ without .yaml")
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
    rp.add_argument("--threads", type=int, help="torch threads (default: all cores)")

    rr = sub.add_parser("report", help="Markdown table and plots of a table's finished runs")
    rr.add_argument("table", help="table name, as given to `attnzoo reproduce`")
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

    ls = sub.add_parser("list", help="list models, attentions, datasets and recipes")
    ls.add_argument("what", nargs="?", choices=["models", "attentions", "datasets", "recipes"])
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    from .train import Interrupted, distributed

    if args.nproc is not None:
        if args.nproc < 1:
            raise ValueError(f"--nproc must be >= 1, got {args.nproc}")
        if args.nproc > 1:
            return launch_train(args)
    ctx = distributed.from_env()
    try:
        summary = run_train(args, ctx)
    except Interrupted as e:
        if ctx.is_main:  # every process stops alike; one line is enough
            print(f"attnzoo: {e}", file=sys.stderr)
        return e.exit_code
    except distributed.PeerFailed:
        return EXIT_USAGE  # process 0 printed the reason
    except RuntimeError as e:
        if not ctx.active:
            raise
        # A process of a data-parallel run died: the others lose their collective.
        reason = " ".join(str(e).split())[:300]
        print(f"attnzoo: error: process {ctx.rank} stopped: {reason}", file=sys.stderr)
        return 1
    finally:
        distributed.shutdown()
    if ctx.is_main:
        print(
            f"done: test error {summary['final_top1_err']:.2f}% (best "
            f"{summary['best_top1_err']:.2f}% at epoch {summary['best_epoch']}), top-1 accuracy "
            f"{100 - summary['final_top1_err']:.2f}%, {summary['params']:,} params, "
            f"{summary['wall_time']:.1f}s"
        )
    return 0


RESUME_OPTIONS = {"command", "resume", "progress", "nproc"}  # all else comes from the run


def train_config(args: argparse.Namespace):
    """The validated TrainConfig and run directory of a fresh ``train`` command line."""
    from .train import resolve_config

    if args.out is not None and not args.out.strip():
        raise ValueError("--out is empty; give a run directory")
    cfg = resolve_config(
        args.recipe if args.recipe is not None else "ham",
        model=args.model,
        attention=None if args.attention in (None, "none") else args.attention,
        attention_kwargs=parse_mapping("--attention-kwargs", args.attention_kwargs),
        model_kwargs=parse_mapping("--model-kwargs", args.model_kwargs),
        dataset=args.dataset,
        data_dir=args.data_dir,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        schedule=args.schedule,
        seed=args.seed,
        threads=args.threads,
        train_subset=args.train_subset,
        test_subset=args.test_subset,
        channels_last=args.channels_last,
        progress=args.progress,
        checkpoint_every_steps=args.checkpoint_every_steps,
        sync_bn=args.sync_bn,
        workers=args.workers,
        image_size=args.image_size,
        compile=COMPILE_FLAGS.get(args.compile),
    )
    out = args.out or Path("runs") / (
        f"{cfg.model}-{cfg.attention or 'none'}-{cfg.dataset}-s{cfg.seed}"
    )
    return cfg, Path(out)


def check_resume_args(args: argparse.Namespace) -> None:
    if not args.resume.strip():
        raise ValueError("--resume is empty; give the run directory to continue")
    given = [k for k, v in vars(args).items() if k not in RESUME_OPTIONS and v is not None]
    if given:
        flags = ", ".join("--" + k.replace("_", "-") for k in sorted(given))
        raise ValueError(f"--resume continues a run as configured; drop {flags}")


def run_train(args: argparse.Namespace, ctx):
    """Train or resume in this process (one rank of a run under torchrun, or the only one)."""
    from .train import resume, train

    if args.resume is not None:
        check_resume_args(args)
        return resume(args.resume, ctx=ctx)
    cfg, out = train_config(args)
    return train(cfg, out, ctx=ctx)


def launch_train(args: argparse.Namespace) -> int:
    """``--nproc K``: check the command line here, then run it in K processes."""
    import os

    from .train import distributed
    from .train.engine import claimed_run_dir, load_run_config

    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise ValueError("--nproc cannot be used inside a distributed launch (torchrun)")
    if args.resume is not None:
        check_resume_args(args)
        load_run_config(args.resume)
        with claimed_run_dir(Path(args.resume), distributed.SINGLE, fresh=False):
            pass  # not in use by a live process, writable
    else:
        cfg, out = train_config(args)
        if cfg.batch_size % args.nproc:
            raise ValueError(
                f"batch_size {cfg.batch_size} is the global batch and must divide evenly among "
                f"{args.nproc} processes"
            )
        with claimed_run_dir(out, distributed.SINGLE, fresh=True):
            pass  # --out is usable (writable, free, no other run); the workers claim it again
        args.out = str(out)  # the workers must agree on the default directory
    return distributed.launch(args.nproc, worker_argv(args))


def worker_argv(args: argparse.Namespace) -> list[str]:
    """The ``train`` command line that gave ``args``, without --nproc (what each worker runs)."""
    train_parser = build_parser()._subparsers._group_actions[0].choices["train"]
    argv = ["train"]
    for action in train_parser._actions:
        value = getattr(args, action.dest, None)
        if not action.option_strings or action.dest in ("help", "nproc") or value is None:
            continue
        flag = action.option_strings[0]
        if isinstance(action, argparse.BooleanOptionalAction):
            argv.append(flag if value else "--no-" + flag[2:])
        else:
            argv.append(f"{flag}={value}")  # '=' keeps a value that starts with '-' a value
    return argv


def cmd_eval(args: argparse.Namespace) -> int:
    from .train import evaluate_run

    result = evaluate_run(args.run, args.data_dir)
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        print(
            f"{args.run}: top-1 error {result['test_top1_err']:.2f}%, top-5 error "
            f"{result['test_top5_err']:.2f}% on {result['images']} test images "
            f"({result['params']:,} params)"
        )
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    import torch

    from .measure import ModelSpec, format_profile, profile
    from .registry import check_attention

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    attention = None if args.attention in (None, "none") else args.attention
    attention_kwargs = parse_mapping("--attention-kwargs", args.attention_kwargs) or {}
    check_attention(attention, attention_kwargs)
    spec = ModelSpec(
        args.model,
        attention,
        attention_kwargs,
        parse_mapping("--model-kwargs", args.model_kwargs) or {},
        args.num_classes,
    )
    spec.build()  # bad names and options fail here, before any measurement
    result = profile(
        spec,
        input_size=args.input_size,
        batch_size=args.batch_size,
        repeats=args.repeats,
        timing=not args.no_timing,
        memory=not args.no_memory,
        threads=args.threads,
    )
    print(json.dumps(result, indent=2, sort_keys=True) if args.json else format_profile(result))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from .measure.bench import bench, check_modes, format_bench
    from .measure.efficiency import efficiency, format_efficiency
    from .measure.sweep import SWEEP_ATTENTIONS, format_sweep, plot_sweep, sweep
    from .registry import check_attention, list_models

    if args.sweep and (args.timm or args.efficiency):
        raise ValueError("--sweep cannot be combined with --timm or --efficiency")
    args.model = args.model or ("resnet20" if args.sweep else "resnet56")
    args.attentions = args.attentions or (
        list(SWEEP_ATTENTIONS) if args.sweep else ["none", "se", "eca", "cbam", "ham"]
    )
    if args.repeats is None:
        args.repeats = 2 if args.sweep else 10
    if args.warmup is None:
        args.warmup = 1 if args.sweep else 2
    if args.model not in list_models():
        raise ValueError(f"unknown model {args.model!r}; choose one of: {', '.join(list_models())}")
    for name in args.attentions:
        check_attention(None if name == "none" else name)
    check_modes(args.modes)
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    common = dict(
        num_classes=args.num_classes,
        repeats=args.repeats,
        warmup=args.warmup,
        model_kwargs=parse_mapping("--model-kwargs", args.model_kwargs),
    )
    if args.sweep or args.efficiency:
        if len(args.modes) != 1:
            raise ValueError("--sweep and --efficiency take one mode")
    if args.sweep:
        result = sweep(
            args.model,
            args.attentions,
            args.batch_sizes,
            args.input_sizes,
            args.modes[0],
            max_step_s=args.max_step_s if args.max_step_s > 0 else None,
            memory_gib=args.memory_gib if args.memory_gib > 0 else None,
            **common,
        )
        if args.plot:
            plot_sweep(result, args.plot)
        text = format_sweep(result)
    elif args.efficiency:
        result = efficiency(
            args.model,
            args.attentions,
            args.modes[0],
            args.batch_size,
            args.input_size,
            matmul_size=args.matmul_size,
            **common,
        )
        text = format_efficiency(result)
    else:
        result = bench(
            args.model,
            args.attentions,
            args.modes,
            batch_size=args.batch_size,
            input_size=args.input_size,
            timm=args.timm,
            **common,
        )
        text = format_bench(result)
    print(json.dumps(result, indent=2) if args.json else text)
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    from .experiments.reproduce import reproduce
    from .train import Interrupted

    try:
        result = reproduce(
            args.table,
            args.rows,
            epochs=args.epochs,
            budget=args.budget,
            seeds=args.seeds,
            dataset=args.dataset,
            data_dir=args.data_dir,
            out=args.out,
            train_subset=args.train_subset,
            test_subset=args.test_subset,
            model=args.model,
            recipe=args.recipe,
            threads=args.threads,
        )
    except Interrupted as e:
        print(f"attnzoo: {e}; run the same reproduce command again to continue", file=sys.stderr)
        return e.exit_code
    c = result["counts"]
    print(
        f"done: {c['trained']} trained, {c['resumed']} resumed, {c['finished_before']} finished "
        f"before; next: attnzoo report {args.table} --out {args.out}"
    )
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .experiments.report import report

    paths = report(args.table, out=args.out, markdown=args.markdown)
    print(paths[0].read_text())
    print(f"wrote {', '.join(str(p) for p in paths)}")
    return 0


def cmd_visualize(args: argparse.Namespace) -> int:
    import torch

    from .viz import visualize

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    result = visualize(
        args.run,
        args.images,
        out=args.out,
        data_dir=args.data_dir,
        seed=args.seed,
        method=args.method,
        cam_class=args.cam_class,
    )
    for reason in result["skipped"]:
        print(f"skipped {reason}")
    print(f"wrote {', '.join(str(p) for p in result['written'])}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from . import list_attentions, list_models
    from .data import list_datasets
    from .train import list_recipes

    tables = {
        "models": list_models(),
        "attentions": list_attentions(),
        "datasets": list_datasets(),
        "recipes": list_recipes(),
    }
    for name, items in tables.items():
        if args.what in (None, name):
            print(f"{name}: {', '.join(items)}")
        if name == "attentions" and args.what in (None, name):
            # Not drop-in C -> C modules: they go in blocks only, or wrap the whole network.
            for level in ("block", "model"):
                print(f"{level}-level attentions: {', '.join(list_attentions(level=level))}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .data import DataError
    from .train import RunError

    try:
        commands = {
            "train": cmd_train,
            "eval": cmd_eval,
            "profile": cmd_profile,
            "bench": cmd_bench,
            "list": cmd_list,
            "reproduce": cmd_reproduce,
            "report": cmd_report,
            "visualize": cmd_visualize,
        }
        return commands[args.command](args)
    except (ValueError, TypeError, DataError, RunError, FileNotFoundError, PermissionError) as e:
        print(f"attnzoo: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("attnzoo: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
