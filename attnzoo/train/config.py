"""Training configuration: a dataclass, filled from a YAML recipe and then overrides.

Recipes live in ``attnzoo/recipes/<name>.yaml`` (or any YAML path) and hold the optimiser
and schedule settings of a paper. A run writes the fully resolved config as config.yaml.

The fast training path, per device (``fastpath.DEVICE_CHOICES``):

| setting | CPU (what this project runs on) | CUDA (not yet measured on a GPU) |
| --- | --- | --- |
| ``device`` | ``"auto"``: the CPU where no GPU is present | ``"auto"``: ``cuda`` when available |
| ``channels_last`` | on: a ResNet-56 step takes 0.86x the NCHW time | on: NHWC suits cuDNN's tensor-core convolutions |
| ``precision`` | ``"auto"``: bf16 autocast on CPUs with bf16 instructions (0.6-0.9x the fp32 step), else fp32 (bf16 was 11.5x slower without them) | ``"auto"``: bf16 autocast where the GPU supports it, else fp32; ``fp16`` trains with a gradient scaler |
| ``compile`` | ``"auto"``: on only when the planned steps repay the 1.5-4.5 min compile (the rule is in ``fastpath.py``) | ``"auto"``: off until measured on a GPU; ``true`` to try |
| ``deterministic`` | no effect (CPU runs are bitwise repeatable) | ``false``: cudnn.benchmark; ``true``: deterministic kernels |

``compile`` is ``"auto"``, ``true`` or ``false`` (CLI ``--compile auto|on|off``), ``precision``
``"auto"``, ``"fp32"``, ``"bf16"`` or ``"fp16"`` (CUDA only); the run's checkpoints record what
``auto`` chose for each, and ``--resume`` keeps those choices. ``device`` is a speed setting
like ``threads``: ``--resume RUN --device cpu`` continues a GPU run on the CPU (and the run
directory lists every device it ran on).

Modern training options (docs/training.md has the details; each default is off and keeps
the papers' recipes byte-for-byte): ``optimizer`` (``sgd`` | ``adamw``, ``betas``),
``label_smoothing``, ``mixup_alpha`` / ``cutmix_alpha`` / ``mix_prob`` /
``mix_switch_prob`` (torchvision's batched MixUp / CutMix), ``ema_decay`` (a weight EMA
evaluated beside the raw weights), ``auto_augment`` (``trivialaugment`` | ``randaugment``,
``rand_augment_ops``, ``rand_augment_magnitude``) and ``random_erasing``. The recipe
``modern_cifar`` uses them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..utils.io import read_yaml_mapping
from ..utils.text import plural

RECIPE_DIR = Path(__file__).resolve().parent.parent / "recipes"
SCHEDULES = ("multistep", "cosine", "constant")
MAX_THREADS = 1024
MAX_IMAGE_SIZE = 4096
FLOAT32_MAX = 3.4028234663852886e38


@dataclass
class TrainConfig:
    model: str = "resnet20"
    attention: str | None = None
    attention_kwargs: dict = field(default_factory=dict)
    model_kwargs: dict = field(default_factory=dict)
    dataset: str = "cifar10"
    data_dir: str | None = None
    recipe: str = "ham"
    epochs: int = 200
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: str = "multistep"
    milestones: list = field(default_factory=lambda: [0.3, 0.6, 0.8])
    gamma: float = 0.2
    warmup_epochs: float = 0
    seed: int = 0
    channels_last: bool = True
    threads: int | None = None
    train_subset: int | None = None  # first N training images only (smoke runs)
    test_subset: int | None = None  # evaluate on the first N test images only (CPU budgets)
    progress: bool | None = None  # tqdm bar; None = only on a terminal
    # Also save checkpoint.pt every N optimizer steps (resume continues inside the epoch);
    # None: at the end of every epoch only.
    checkpoint_every_steps: int | None = None
    # Data-parallel runs: batch-norm statistics over the global batch instead of each
    # process's share (no effect on one process).
    sync_bn: bool = False
    # Folder datasets (imagenet): image-decoding worker processes per training process
    # (None: min(4, CPU cores); 0: in the training process) and the crop side (None: 224).
    workers: int | None = None
    image_size: int | None = None
    # torch.compile the training step: "auto" (decided when the run starts, see the module
    # docstring), true or false.
    compile: str | bool = "auto"
    # Autocast of the forward pass: "auto" (bf16 where the CPU has bf16 instructions, else
    # fp32; fastpath.decide_precision), "fp32", "bf16" or "fp16" (CUDA only).
    precision: str = "auto"
    # Where to train: "auto" (CUDA when available, else the CPU), "cpu", "cuda" or "cuda:N"
    # (fastpath.resolve_device). A speed setting like threads: a resume may pick another.
    device: str = "auto"
    # CUDA: bitwise repeatable kernels (no cudnn.benchmark, deterministic algorithms), at some
    # speed. The CPU is deterministic already.
    deterministic: bool = False
    # Loggers that show each epoch's metrics.jsonl row elsewhere (loggers.LOGGERS), e.g.
    # ["tensorboard"]; and for tensorboard, figures every N epochs and at the end (0: none).
    log: list = field(default_factory=list)
    log_figures_every: int = 10

    # Modern training options (docs/training.md; every default keeps the papers' recipes).
    # optim.py: "sgd" or "adamw" (betas; no weight decay on BN/biases with adamw).
    optimizer: str = "sgd"
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    # CrossEntropyLoss's label_smoothing, in [0, 1).
    label_smoothing: float = 0.0
    # mixing.py: Beta alphas of mixup / CutMix (0 = off), the probability a batch is mixed,
    # and with both on the probability of CutMix rather than mixup.
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_prob: float = 1.0
    mix_switch_prob: float = 0.5
    # ema.py: decay of a weight EMA evaluated beside the raw weights (0 = none).
    ema_decay: float = 0.0
    # data/augment.py (in-memory datasets): a per-image policy, "none", "trivialaugment" or
    # "randaugment" (with rand_augment_ops ops at magnitude bin rand_augment_magnitude of
    # 31), and the probability of random erasing per image.
    auto_augment: str = "none"
    rand_augment_ops: int = 2
    rand_augment_magnitude: int = 9
    random_erasing: float = 0.0

    def validate(self) -> TrainConfig:
        from ..data.datasets import check_dataset
        from ..registry import check_attention, list_models
        from .fastpath import check_compile, check_device, check_precision
        from .loggers import check_log

        check_compile(self.compile)
        check_precision(self.precision)
        check_device(self.device)
        check_training_options(self)
        self.log = check_log(self.log)  # a single name becomes a one-item list
        every = self.log_figures_every
        if not isinstance(every, int) or isinstance(every, bool) or every < 0:
            raise ValueError(
                f"log_figures_every must be an int >= 0 (0: no figures), got {every!r}"
            )

        for name in ("model", "dataset", "recipe", "schedule"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string, got {getattr(self, name)!r}")
        for name in ("attention", "data_dir"):
            if not isinstance(getattr(self, name), (str, type(None))):
                raise ValueError(f"{name} must be a string or null, got {getattr(self, name)!r}")
        for name in ("nesterov", "channels_last", "sync_bn", "deterministic"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not isinstance(self.progress, (bool, type(None))):
            raise ValueError(f"progress must be true, false or null, got {self.progress!r}")
        if self.model not in list_models():
            raise ValueError(
                f"unknown model {self.model!r}; choose one of: {', '.join(list_models())}"
            )
        for name in ("attention_kwargs", "model_kwargs"):
            if not isinstance(getattr(self, name), dict):
                raise ValueError(f"{name} must be a mapping, got {getattr(self, name)!r}")
        check_attention(self.attention, self.attention_kwargs)
        check_dataset(self.dataset)
        _positive_int("epochs", self.epochs)
        _positive_int("batch_size", self.batch_size)
        for name in ("lr", "momentum", "weight_decay", "gamma", "warmup_epochs"):
            value = getattr(self, name)
            if (
                not isinstance(value, (int, float))
                or isinstance(value, bool)
                or not math.isfinite(value)
                or value < 0
            ):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
            if value > FLOAT32_MAX:  # the optimizer computes in float32: it would overflow
                raise ValueError(f"{name} must be <= {FLOAT32_MAX:.4g}, got {value!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.schedule not in SCHEDULES:
            raise ValueError(
                f"unknown schedule {self.schedule!r}; choose one of: {', '.join(SCHEDULES)}"
            )
        if not isinstance(self.milestones, list) or not all(
            isinstance(m, (int, float)) and 0 < m < 1 for m in self.milestones
        ):
            raise ValueError(
                f"milestones must be fractions of the run in (0, 1), got {self.milestones!r}"
            )
        if self.warmup_epochs >= self.epochs:
            raise ValueError(
                f"warmup_epochs ({self.warmup_epochs}) must be < epochs ({self.epochs}); "
                f"lower it with --warmup-epochs"
            )
        for name in ("train_subset", "test_subset"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        if self.threads is not None:
            _positive_int("threads", self.threads)
            if self.threads > MAX_THREADS:  # more would only exhaust the machine's threads
                raise ValueError(f"threads must be <= {MAX_THREADS}, got {self.threads}")
        if self.checkpoint_every_steps is not None:
            _positive_int("checkpoint_every_steps", self.checkpoint_every_steps)
        if self.workers is not None and (
            not isinstance(self.workers, int) or isinstance(self.workers, bool) or self.workers < 0
        ):
            raise ValueError(f"workers must be an int >= 0, got {self.workers!r}")
        if self.image_size is not None:
            _positive_int("image_size", self.image_size)
            if not 8 <= self.image_size <= MAX_IMAGE_SIZE:
                raise ValueError(
                    f"image_size must be in 8..{MAX_IMAGE_SIZE}, got {self.image_size}"
                )
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        if not -(2**63) <= self.seed < 2**64:  # what torch.manual_seed accepts
            raise ValueError(f"seed must be in [-2**63, 2**64), got {self.seed}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        if not isinstance(values, dict):
            raise ValueError(f"a config must be a mapping, got {type(values).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(
                f"unknown config key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(names))}"
            )
        return cls(**values)


def check_training_options(cfg: TrainConfig) -> None:
    """The modern training options: each module checks its own settings."""
    from ..data.augment import check_augment
    from .ema import check_ema
    from .mixing import check_mixing
    from .optim import check_optimizer

    check_optimizer(cfg.optimizer, cfg.betas)
    smoothing = cfg.label_smoothing
    if (
        not isinstance(smoothing, (int, float))
        or isinstance(smoothing, bool)
        or not 0 <= smoothing < 1
    ):
        raise ValueError(f"label_smoothing must be in [0, 1), e.g. 0.1; got {smoothing!r}")
    check_mixing(cfg.mixup_alpha, cfg.cutmix_alpha, cfg.mix_prob, cfg.mix_switch_prob)
    check_ema(cfg.ema_decay)
    check_augment(
        cfg.auto_augment, cfg.rand_augment_ops, cfg.rand_augment_magnitude, cfg.random_erasing
    )


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def load_recipe(name: str) -> dict[str, Any]:
    """A recipe by name (see ``list_recipes()``) or by path to a YAML file."""
    path = Path(name)
    if path.suffix not in (".yaml", ".yml"):
        if name not in list_recipes():
            raise ValueError(f"unknown recipe {name!r}; choose one of: {', '.join(list_recipes())}")
        path = RECIPE_DIR / f"{name}.yaml"
    return read_yaml_mapping(path, ValueError, "recipe")


def resolve_config(
    recipe: str = "ham", notes: list[str] | None = None, **overrides: Any
) -> TrainConfig:
    """Recipe values, then the non-None overrides, validated.

    A recipe's warmup that does not fit a run shortened with ``epochs`` (a one-epoch smoke
    run of a recipe with one warmup epoch) keeps its share of the recipe's run instead of
    failing; what was changed is appended to ``notes``. A warmup given explicitly is kept as
    given (and must fit).
    """
    values = load_recipe(recipe)
    values["recipe"] = recipe
    given = {k: v for k, v in overrides.items() if v is not None}
    recipe_epochs, recipe_warmup = values.get("epochs"), values.get("warmup_epochs") or 0
    values.update(given)
    epochs = values.get("epochs")
    if (
        "warmup_epochs" not in given
        and _is_number(recipe_warmup)
        and _is_number(recipe_epochs)
        and _is_number(epochs)
        and 0 < epochs <= recipe_warmup
        and recipe_epochs > 0
    ):
        scaled = recipe_warmup * epochs / recipe_epochs
        values["warmup_epochs"] = scaled
        if notes is not None:
            notes.append(
                f"the {recipe} recipe's {plural(recipe_warmup, 'warmup epoch')} would not fit a "
                f"{epochs}-epoch run: warming up for {scaled:.3g} epochs instead (the same share "
                f"of the run as in the recipe's {plural(recipe_epochs, 'epoch')}; "
                f"--warmup-epochs sets it)"
            )
    return TrainConfig.from_dict(values).validate()


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
