"""``attnzoo train``: a fresh run, ``--resume``, and ``--nproc K`` data-parallel launches."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .parser import COMPILE_FLAGS, EXIT_USAGE, build_parser, parse_mapping, parse_overrides


def cmd_train(args: argparse.Namespace) -> int:
    from ..train import Interrupted, distributed

    if args.nproc is not None:
        if args.nproc < 1:
            raise ValueError(f"--nproc must be >= 1, got {args.nproc}")
        if args.nproc > 1:
            return launch_train(args)
    ctx = distributed.from_env(args.device or device_of_run(args))
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


RESUME_OPTIONS = {"command", "resume", "progress", "nproc", "device"}  # else from the run


def device_of_run(args: argparse.Namespace) -> str:
    """The device setting of the run this command line starts or resumes (for the process
    group's backend); 'auto' when it is not known here."""
    if args.resume is None:
        return "auto"
    try:
        from ..train.engine import load_run_config

        return load_run_config(args.resume).device
    except Exception:  # noqa: BLE001 - the resume itself reports a bad run directory
        return "auto"


# The modern training options (docs/training.md): each flag sets the config key of its name.
TRAINING_OPTIONS = (
    "optimizer",
    "betas",
    "label_smoothing",
    "mixup_alpha",
    "cutmix_alpha",
    "mix_prob",
    "mix_switch_prob",
    "ema_decay",
    "auto_augment",
    "rand_augment_ops",
    "rand_augment_magnitude",
    "random_erasing",
)


def train_config(args: argparse.Namespace, notes: list[str] | None = None):
    """The validated TrainConfig and run directory of a fresh ``train`` command line; what the
    resolution changed on its own (a scaled warmup) is appended to ``notes``."""
    from ..train import resolve_config

    if args.out is not None and not args.out.strip():
        raise ValueError("--out is empty; give a run directory")
    flags = dict(
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
        precision=args.precision,
        device=args.device,
        deterministic=args.deterministic,
        momentum=args.momentum,
        nesterov=args.nesterov,
        milestones=args.milestones,
        gamma=args.gamma,
        warmup_epochs=args.warmup_epochs,
        log=args.log,
        log_figures_every=args.log_figures_every,
        **{name: getattr(args, name) for name in TRAINING_OPTIONS},
    )
    overrides = parse_overrides(args.overrides)
    if "recipe" in overrides:
        raise ValueError("choose the recipe with --recipe, not --set recipe=...")
    twice = sorted(k for k in overrides if flags.get(k) is not None)
    if twice:
        raise ValueError(f"{', '.join(twice)} given both as a flag and with --set; keep one")
    if overrides.get("attention") in ("none", ""):
        overrides["attention"] = None
    # A --set key=null means "the default": drop it so the recipe's value stays.
    flags.update({k: v for k, v in overrides.items() if v is not None})
    cfg = resolve_config(args.recipe if args.recipe is not None else "ham", notes=notes, **flags)
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
    from ..train import resume, train

    if args.resume is not None:
        check_resume_args(args)
        return resume(args.resume, ctx=ctx, device=args.device)
    notes: list[str] = []
    cfg, out = train_config(args, notes)
    if ctx.is_main:
        for note in notes:
            print(f"note: {note}")
    return train(cfg, out, ctx=ctx)


def launch_train(args: argparse.Namespace) -> int:
    """``--nproc K``: check the command line here, then run it in K processes."""
    import os

    from ..train import distributed
    from ..train.engine import claimed_run_dir, load_run_config
    from ..train.loggers import require_loggers

    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise ValueError("--nproc cannot be used inside a distributed launch (torchrun)")
    if args.resume is not None:
        check_resume_args(args)
        require_loggers(load_run_config(args.resume).log)
        with claimed_run_dir(Path(args.resume), distributed.SINGLE, fresh=False):
            pass  # not in use by a live process, writable
    else:
        cfg, out = train_config(args)
        require_loggers(cfg.log)  # once here, not once per worker
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
        elif isinstance(action, argparse._AppendAction):  # --set, once per item
            argv.extend(f"{flag}={item}" for item in value)
        elif isinstance(value, list):  # nargs="+": numbers (a '-' first would need care)
            argv.extend([flag, *map(str, value)])
        else:
            argv.append(f"{flag}={value}")  # '=' keeps a value that starts with '-' a value
    return argv
