"""The other commands: ``eval``, ``profile``, ``bench``, ``reproduce``, ``report``,
``visualize``, ``export`` and ``list``. Each only parses its arguments and calls the library.

``profile`` and ``bench`` measure on ``--device`` (default ``auto``: CUDA when available);
a bad or absent device is one ``attnzoo: error:`` line (status 2), and a measurement that
runs out of GPU memory is one line naming the case and a smaller ``--batch-size`` (status
1, ``EXIT_OUT_OF_MEMORY``); the sweep records such points instead of stopping."""

from __future__ import annotations

import argparse
import json
import sys

from .parser import parse_mapping


def set_threads(threads: int | None) -> None:
    """``--threads N`` of the measuring commands: torch's intra-op threads (None: all cores)."""
    import torch

    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)


# A measurement that ran out of GPU memory: the input was valid, the device too small for it.
EXIT_OUT_OF_MEMORY = 1


def measure_device(args: argparse.Namespace):
    """``--device`` of profile and bench as a torch.device (``ValueError``, printed as one
    line, for a bad value or a CUDA device that is not there); notes that ``--threads``
    does not apply on CUDA."""
    from ..measure.bench import as_device

    try:
        device = as_device(args.device)
    except ValueError as e:
        text = str(e)
        raise ValueError(text if text.startswith("--device") else f"--device: {text}") from None
    if device.type == "cuda" and args.threads is not None:
        print(
            f"attnzoo: note: --threads {args.threads} sets CPU threads; it does not apply to "
            f"the measurement on {device}",
            file=sys.stderr,
        )
    return device


def out_of_memory(error: Exception) -> int:
    print(f"attnzoo: error: {error}", file=sys.stderr)
    return EXIT_OUT_OF_MEMORY


def cmd_eval(args: argparse.Namespace) -> int:
    from ..train import evaluate_run

    result = evaluate_run(args.run, args.data_dir, ema=args.ema, device=args.device)
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        print(
            f"{args.run}{' (EMA weights)' if args.ema else ''}: top-1 error {result['test_top1_err']:.2f}%, top-5 error "
            f"{result['test_top5_err']:.2f}% on {result['images']} test images "
            f"({result['params']:,} params)"
        )
    return 0


def cmd_profile(args: argparse.Namespace) -> int:

    from ..measure import ModelSpec, format_profile, profile
    from ..measure.bench import DeviceOutOfMemory
    from ..registry import check_attention

    set_threads(args.threads)
    device = measure_device(args)
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
    try:
        result = profile(
            spec,
            input_size=args.input_size,
            batch_size=args.batch_size,
            repeats=args.repeats,
            timing=not args.no_timing,
            memory=not args.no_memory,
            threads=args.threads,
            device=device,
        )
    except DeviceOutOfMemory as e:
        return out_of_memory(e)
    print(json.dumps(result, indent=2, sort_keys=True) if args.json else format_profile(result))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:

    from ..measure.bench import DeviceOutOfMemory, bench, check_modes, format_bench
    from ..measure.efficiency import efficiency, format_efficiency
    from ..measure.sweep import SWEEP_ATTENTIONS, format_sweep, plot_sweep, sweep
    from ..registry import check_attention, list_models

    if args.sweep and (args.timm or args.efficiency):
        raise ValueError("--sweep cannot be combined with --timm or --efficiency")
    if (args.sweep or args.efficiency) and (args.kernels or args.inference):
        raise ValueError(
            "--kernels and --inference apply to the plain bench, not --sweep or --efficiency"
        )
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
    set_threads(args.threads)
    common = dict(
        num_classes=args.num_classes,
        repeats=args.repeats,
        warmup=args.warmup,
        model_kwargs=parse_mapping("--model-kwargs", args.model_kwargs),
        device=measure_device(args),
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
    else:
        try:
            if args.efficiency:
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
                    kernels_ab=args.kernels,
                    inference=args.inference,
                    **common,
                )
                text = format_bench(result)
        except DeviceOutOfMemory as e:
            return out_of_memory(e)
    print(json.dumps(result, indent=2) if args.json else text)
    return 0


def slurm_options(args: argparse.Namespace):
    from ..experiments.cluster import SlurmOptions

    slurm_flags = [k for k, v in vars(args).items() if k.startswith("slurm_") and v]
    if args.launcher is None and set(slurm_flags) - {"slurm_time"}:
        raise ValueError("--slurm-* options need --launcher slurm")
    if args.launcher is not None and args.jobs != 1:
        raise ValueError("--jobs runs cells here; with --launcher the scheduler runs them")
    return SlurmOptions(
        partition=args.slurm_partition,
        gpus=args.slurm_gpus,
        cpus=args.slurm_cpus,
        time_min=args.slurm_time,
        account=args.slurm_account,
        mem_gb=args.slurm_mem_gb,
        parallel=args.slurm_parallel,
        folder=args.slurm_folder,
    )


def cmd_reproduce(args: argparse.Namespace) -> int:
    from ..experiments.reproduce import reproduce
    from ..train import Interrupted

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
            jobs=args.jobs,
            launcher=args.launcher,
            slurm=slurm_options(args),
            devices=args.devices,
        )
    except Interrupted as e:
        print(f"attnzoo: {e}; run the same reproduce command again to continue", file=sys.stderr)
        return e.exit_code
    c = result["counts"]
    if args.launcher == "slurm":
        print(
            f"submitted {c.get('submitted', 0)} Slurm job(s) ({c['finished_before']} finished "
            f"before); when they are done: attnzoo report {args.table} --out {args.out}"
        )
        return 0
    print(
        f"done: {c['trained']} trained, {c['resumed']} resumed, {c['finished_before']} finished "
        f"before; next: attnzoo report {args.table} --out {args.out}"
    )
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from ..experiments.report import report

    paths = report(args.table, out=args.out, markdown=args.markdown)
    print(paths[0].read_text())
    print(f"wrote {', '.join(str(p) for p in paths)}")
    return 0


def cmd_visualize(args: argparse.Namespace) -> int:

    from ..viz import visualize

    set_threads(args.threads)
    result = visualize(
        args.run,
        args.images,
        out=args.out,
        data_dir=args.data_dir,
        seed=args.seed,
        method=args.method,
        cam_class=args.cam_class,
        device=args.device,
    )
    for reason in result["skipped"]:
        print(f"skipped {reason}")
    print(f"wrote {', '.join(str(p) for p in result['written'])}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from ..hub import export_run

    config = export_run(args.run_dir, args.out_dir, force=args.force)
    print(
        f"wrote {args.out_dir}: {config['model']} + {config['attention'] or 'no attention'}, "
        f"top-1 error {config['results']['final_top1_err']:.2f}% on {config['dataset']}; load "
        f"it with attnzoo.hub.load_pretrained({str(args.out_dir)!r})"
    )
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from .. import list_attentions, list_models
    from ..data import list_datasets
    from ..experiments.spec import list_tables
    from ..train import list_recipes

    tables = {
        "models": list_models(),
        "attentions": list_attentions(),
        "datasets": list_datasets(),
        "recipes": list_recipes(),
        "tables": list_tables(),
    }
    for name, items in tables.items():
        if args.what in (None, name):
            print(f"{name}: {', '.join(items)}")
        if name == "attentions" and args.what in (None, name):
            # Not drop-in C -> C modules: they go in blocks only, replace a block's 3x3 conv,
            # or wrap the whole network.
            for level in ("block", "conv", "model"):
                print(f"{level}-level attentions: {', '.join(list_attentions(level=level))}")
    return 0
