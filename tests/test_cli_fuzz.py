"""Fuzzing the command line (attnzoo/cli.py): seeded random and malformed argument lists.

Every case runs in-process through ``attnzoo.cli.main(argv)`` and must

- return 0 or 2 (argparse's own errors exit 2 too),
- print no traceback, and for our errors exactly one ``attnzoo: error: ...`` line,
- leave no temp file and no lock file; a failed fresh ``train`` leaves no run directory
  (or, if training itself failed in its first epoch, one holding just its config.yaml); a
  successful ``train`` leaves exactly the five run files.

To keep the whole fuzz short, datasets are tiny (``digits`` cut to 48 training and 24 test
images; CIFAR is "offline"), runs are capped at 2 epochs and 2 threads; everything else
(argument parsing, config validation, model building, the run directory, checkpoints) is
the real code.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from attnzoo.cli import build_parser, main
from attnzoo.data import Split
from attnzoo.train import engine

# More cases or another seed for a longer hunt: ATTNZOO_FUZZ_CASES=5000 ATTNZOO_FUZZ_SEED=7
SEED = int(os.environ.get("ATTNZOO_FUZZ_SEED", "20251125"))
CASES = int(os.environ.get("ATTNZOO_FUZZ_CASES", "600"))
RUN_FILES = {"config.yaml", "metrics.jsonl", "summary.json", "model.safetensors", "checkpoint.pt"}

BASE = ["--dataset", "digits", "--model", "resnet20", "--epochs", "1", "--train-subset", "32"]
BASE += ["--batch-size", "16", "--threads", "1", "--no-progress"]

INTS = ["1", "2", "0", "-1", "-7", "3.5", "1e3", "0x10", "", " ", "abc", "nan", "1_0", "٣"]
INTS += ["99999999999999999999999", str(2**63), str(2**64), "-" + str(2**70), "2048", "1025"]
FLOATS = ["0.05", "0", "-0.1", "nan", "inf", "-inf", "1e308", "1e-320", "1e999", "", "x", "0x1p-3"]
NAMES = ["", " ", "none", "None", "null", "RESNET20", "resnet21", "ham ", "../etc", "x" * 300]
NAMES += ["\u00e9", "-", "--", "a,b"]
KWARGS = [
    "{", "}", "[1, 2]", "3", "'str'", "null", "~", "", "{x: 1}", "{\"reduction\": -1}",
    "{\"kernel_size\": 0}", "{\"kernel_size\": 1e400}", "{\"kernel_size\": 2}",
    "{\"separation_rate\": \"0.5\"}", "{\"separation_rate\": 1.5}", "{\"separation_rate\": 0.5}",
    "{\"a\": {\"b\": [1, {\"c\": null}]}}", "!!python/object/apply:os.system ['echo pwned']",
    "&a [*a]", "{1: 2}", "{\"placement\": \"stage\"}", "{\"placement\": \"nowhere\"}",
    "{\"shortcut\": \"B\"}", "{\"shortcut\": 7}", "{\"in_chans\": 0}", "{\"in_chans\": 1}",
    "{\"in_chans\": true}", "{\"num_classes\": 3}", "{\"attention\": \"se\"}", "{\"depth\": 7}",
    "{\"stem\": \"imagenet\"}", "{\"width_mult\": 0.0001}", "{\"dropout\": 2}", "[" * 3000,
    "{\"mode\": \"x\"}", "{\"spatial\": null}", "{\"groups\": 3}", "{\"dilation\": -1}",
    "{\"reduction\": 4, \"reduction\": 8}", "\x00", "{\"kernel_size\": [3]}",
]  # fmt: skip
MODELS = ["resnet20", "resnet32", "mobilenet_v2", "resnet18", "densenet_bc_100_12", *NAMES]
ATTENTIONS = ["ham", "se", "eca", "cbam", "bam", "gam", "abn", "bridge", "none", "hamm", *NAMES]
SCHEDULES = ["multistep", "cosine", "constant", "step", "", "COSINE"]


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------ the world the cases see


def tiny_digits(real_load):
    data = real_load("digits")
    data.train = Split(data.train.images[:48], data.train.labels[:48])
    data.test = Split(data.test.images[:24], data.test.labels[:24])
    return data


def offline(*args, **kwargs):
    raise RuntimeError("<urlopen error [Errno -3] Temporary failure in name resolution>")


@pytest.fixture
def fuzz_world(tmp_path, monkeypatch):
    """Patch in the small world, build the garbage files and runs; chdir to a scratch dir."""
    real_load = engine.load_dataset
    digits = tiny_digits(real_load)

    def load_dataset(name, data_dir=None):
        if name == "digits":
            return digits
        return real_load(name, data_dir)

    real_fit, real_threads = engine.Trainer.fit, torch.set_num_threads

    def capped_fit(self, log=print, stop=None):
        self.cfg.epochs = min(self.cfg.epochs, 2)
        return real_fit(self, log, stop)

    monkeypatch.setattr(engine, "load_dataset", load_dataset)
    monkeypatch.setattr(engine.Trainer, "fit", capped_fit)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: real_threads(min(n, 2)))
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    monkeypatch.setattr(torchvision.datasets, "CIFAR100", offline)
    monkeypatch.setenv("ATTNZOO_DATA", str(tmp_path / "data"))
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    files, runs = make_garbage(tmp_path / "garbage", monkeypatch)
    return tmp_path, files, runs


def make_garbage(root: Path, monkeypatch) -> tuple[list[str], list[str]]:
    """Garbage files (for --recipe, --data-dir, --out, --resume, --run) and broken run dirs."""
    root.mkdir()
    rng = np.random.default_rng(SEED)
    files = {
        "bytes.yaml": rng.integers(0, 256, 4000, dtype=np.uint8).tobytes(),
        "list.yaml": b"- 1\n- 2\n",
        "tags.yaml": b"!!python/object/apply:os.system ['echo pwned']\n",
        "unknown-key.yaml": b"epochz: 3\n",
        "bomb.yaml": b'a: &a ["x","x","x","x","x","x","x","x","x","x"]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b]\n',
        "empty.yaml": b"",
        "plain.txt": b"hello\n",
    }
    paths = []
    for name, data in files.items():
        (root / name).write_bytes(data)
        paths.append(str(root / name))
    (root / "dir.yaml").mkdir()
    paths += [str(root / "dir.yaml"), str(root / "missing" / "x"), str(root / "plain.txt" / "x")]

    # A real finished run to break in many ways.
    good = root / "good"
    assert main(["train", *BASE, "--out", str(good)]) == 0
    state = torch.load(good / "checkpoint.pt", weights_only=True)
    config = (good / "config.yaml").read_text()
    runs = [str(good)]

    def broken(name: str, file: str, data) -> None:
        """A copy of the good run with ``file`` replaced by ``data`` (None: deleted)."""
        run = root / name
        run.mkdir()
        for other in RUN_FILES - {file}:
            (run / other).write_bytes((good / other).read_bytes())
        if isinstance(data, dict):
            torch.save(data, run / file)
        elif data is not None:
            (run / file).write_bytes(data if isinstance(data, bytes) else data.encode())
        runs.append(str(run))

    (root / "empty-run").mkdir()
    runs += [str(root / "empty-run"), str(root / "plain.txt")]
    broken("config-bytes", "config.yaml", files["bytes.yaml"])
    broken("config-list", "config.yaml", "[1, 2]\n")
    broken("config-bomb", "config.yaml", files["bomb.yaml"])
    for i, line in enumerate(
        [
            "epochs: '3'", "model: 5", "model_kwargs: [1]", "attention: {a: 1}",
            "dataset: [digits]", "threads: 100000", "seed: 1e400", "lr: .nan", "batch_size: 0",
            "model_kwargs: {in_chans: 1}", "model_kwargs: {widths: []}", "data_dir: 7",
            "channels_last: maybe", "checkpoint_every_steps: -3", "epochs: 1000000000",
            "train_subset: 100000000000000000000", "progress: 3", "milestones: .inf",
            "warmup_epochs: 1e400", "attention_kwargs: {kernel_size: 3}",
        ]
    ):  # fmt: skip
        broken(f"config-{i}", "config.yaml", config + line + "\n")
    broken("config-missing", "config.yaml", None)
    broken("checkpoint-bytes", "checkpoint.pt", rng.integers(0, 256, 5000, np.uint8).tobytes())
    broken("checkpoint-truncated", "checkpoint.pt", (good / "checkpoint.pt").read_bytes()[:5000])
    broken("checkpoint-empty", "checkpoint.pt", b"")
    broken("checkpoint-missing", "checkpoint.pt", None)
    broken("checkpoint-dict", "checkpoint.pt", {"not": "a checkpoint"})
    for key, value in [
        ("epoch", -1), ("epoch", 10**6), ("step", "x"), ("rng", {}), ("loader", {"order": 3}),
        ("progress", {"steps_done": 1}), ("optimizer", {}), ("model", {}),
        ("loader", {"generator": torch.zeros(3, dtype=torch.uint8), "order": None, "position": 0}),
        ("progress", {"steps_done": 5, "loss_sum": torch.zeros(()), "correct": torch.zeros(()),
                      "seen": 1, "loader_time": 0.0, "train_time": 0.0}),
    ]:  # fmt: skip
        broken(f"state-{key}-{len(runs)}", "checkpoint.pt", {**state, key: value})
    broken("weights-cut", "model.safetensors", (good / "model.safetensors").read_bytes()[:999])
    broken("weights-bytes", "model.safetensors", b"\xff" * 64)
    broken("metrics-bytes", "metrics.jsonl", files["bytes.yaml"])
    broken("metrics-short", "metrics.jsonl", b"")
    broken("metrics-not-json", "metrics.jsonl", b"{nope\n")
    return paths, runs


# ------------------------------------------------------------------ the cases


def value_pool(flag: str, files: list[str], runs: list[str], scratch: Path) -> list[str]:
    fresh = str(scratch / f"out-{random.random():.12f}")
    pools = {
        "--model": MODELS,
        "--attention": ATTENTIONS,
        "--attention-kwargs": KWARGS,
        "--model-kwargs": KWARGS,
        "--dataset": ["digits", "cifar10", "cifar100", "imagenet", *NAMES],
        "--data-dir": [*files, str(scratch / "data-x"), ""],
        "--recipe": ["ham", "digits", "cosine", "hamm", *files, *NAMES],
        "--epochs": INTS,
        "--batch-size": INTS,
        "--lr": FLOATS,
        "--weight-decay": FLOATS,
        "--schedule": SCHEDULES,
        "--seed": INTS,
        "--threads": INTS,
        "--train-subset": INTS,
        "--checkpoint-every-steps": INTS,
        "--out": [fresh, fresh, *files, *runs, "", " "],
        "--resume": [*runs, *files, "", " "],
        "--nproc": ["1", "0", "-1", "x", ""],
    }
    return pools[flag]


FLAGS = [
    "--model", "--attention", "--attention-kwargs", "--model-kwargs", "--dataset", "--data-dir",
    "--recipe", "--epochs", "--batch-size", "--lr", "--weight-decay", "--schedule", "--seed",
    "--threads", "--train-subset", "--checkpoint-every-steps", "--out", "--resume", "--nproc",
]  # fmt: skip
SWITCHES = ["--channels-last", "--no-channels-last", "--progress", "--no-progress", "--sync-bn"]
SWITCHES += ["--no-sync-bn", "--json", "-h"]
JUNK = ["--frobnicate", "-x", "--epoch", "--", "-", "train", "eval", "--=", "--lr=", "\x00", "ü"]


def mutate(argv: list[str], rng: random.Random, files, runs, scratch) -> list[str]:
    argv = list(argv)
    kind = rng.random()
    if kind < 0.55:  # a flag gets a random (usually bad) value
        flag = rng.choice(FLAGS)
        value = rng.choice(value_pool(flag, files, runs, scratch))
        if flag in argv[:-1] and rng.random() < 0.7:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value] if rng.random() < 0.8 else [f"{flag}={value}"]
    elif kind < 0.65:
        argv.append(rng.choice(FLAGS))  # a flag missing its value
    elif kind < 0.8:
        argv.insert(rng.randrange(len(argv) + 1), rng.choice(JUNK + SWITCHES))
    elif kind < 0.9 and argv:
        del argv[rng.randrange(len(argv))]
    else:
        argv.append(rng.choice(SWITCHES))
    return argv


def make_case(rng: random.Random, files, runs, scratch: Path) -> tuple[list[str], Path | None]:
    """An argument list, and the fresh --out directory it trains into (if any)."""
    kind = rng.random()
    if kind < 0.6:
        out = scratch / f"run-{rng.randrange(10**9)}"
        argv = ["train", *BASE, "--out", str(out)]
        for _ in range(rng.choice([1, 1, 1, 2, 3])):
            argv = mutate(argv, rng, files, runs, scratch)
        return argv, out
    if kind < 0.75:
        argv = ["train", "--resume", rng.choice(runs + files + ["", "nope"])]
        if rng.random() < 0.4:
            argv = mutate(argv, rng, files, runs, scratch)
        return argv, None
    if kind < 0.9:
        argv = ["eval", "--run", rng.choice(runs + files + ["", "nope"])]
        if rng.random() < 0.3:
            argv.append("--json")
        if rng.random() < 0.3:
            argv += ["--data-dir", rng.choice(files + [""])]
        if rng.random() < 0.3:
            argv = mutate(argv, rng, files, runs, scratch)
        return argv, None
    tokens = ["list", "models", "attentions", "datasets", "recipes", "train", "eval", "profile"]
    argv = [rng.choice(tokens + JUNK) for _ in range(rng.randrange(4))]
    if argv[:1] == ["profile"]:
        argv.append("--bogus")  # profile itself measures; only its argument errors here
    return argv, None


def fresh_out_dir(argv: list[str], out: Path | None, capsys) -> Path | None:
    """``out`` if ``argv`` is a fresh ``train`` into it (mutations may have changed that)."""
    if out is None:
        return None
    try:
        args = build_parser().parse_args(argv)
    except SystemExit:
        return None
    finally:
        capsys.readouterr()
    fresh = args.command == "train" and args.resume is None and args.out == str(out)
    return out if fresh else None


def temp_and_lock_files(root: Path) -> list[str]:
    return sorted(
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.name.endswith(".tmp") or p.name == "run.lock"
    )


def check_case(argv, code, err, out_dir, root, cwd_before) -> None:
    where = f"argv={argv!r}\nstderr={err[-2000:]}"
    assert code in (0, 2), where
    assert "Traceback" not in err, where
    lines = err.strip().splitlines()
    if code == 2:
        ours = [line for line in lines if line.startswith("attnzoo: error: ")]
        parser = lines and ": error: " in lines[-1] and lines[-1].startswith("attnzoo")
        assert (len(lines) == 1 and len(ours) == 1) or parser, where
        if out_dir is not None and out_dir.exists():
            # Only a run that failed inside its first epoch leaves its (complete) config.yaml,
            # by design: the same --out starts it again.
            assert [p.name for p in out_dir.iterdir()] == ["config.yaml"], where
        assert sorted(os.listdir(".")) == cwd_before, where  # no runs/ made in the cwd
    elif out_dir is not None and "-h" not in argv and "--help" not in argv:
        assert {p.name for p in out_dir.iterdir()} == RUN_FILES, where
    assert temp_and_lock_files(root) == [], where


def test_cli_fuzz(fuzz_world, capsys):
    root, files, runs = fuzz_world
    capsys.readouterr()
    rng = random.Random(SEED)
    scratch = root / "scratch"
    scratch.mkdir()
    codes, started = Counter(), time.perf_counter()
    for _ in range(CASES):
        argv, out_dir = make_case(rng, files, runs, scratch)
        out_dir = fresh_out_dir(argv, out_dir, capsys)
        cwd_before = sorted(os.listdir("."))
        code, _, err = run_cli(argv, capsys)
        check_case(argv, code, err, out_dir, root, cwd_before)
        codes[code] += 1
    elapsed = time.perf_counter() - started
    print(f"\n{CASES} cases in {elapsed:.0f} s, exit codes {json.dumps(dict(codes))}")
    assert codes[0] > 0.05 * CASES and codes[2] > 0.5 * CASES  # both kinds are exercised
