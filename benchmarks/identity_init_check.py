"""Function preservation at init: for every attention, max |logits - plain logits| / max
|plain logits| of a network whose backbone has the plain network's (random, "pretrained")
weights, with ``attention_init="identity"`` and with the default init, in eval and train mode.

    python benchmarks/identity_init_check.py [resnet20 resnet50]

4 images of 32x32, float32, default placements. "refused": the attention cannot start as
the identity (attention/identity_init.py says why) and create_model raises.
"""

from __future__ import annotations

import sys

import torch

import attnzoo
from attnzoo.registry import attention_level
from attnzoo.utils.machine import describe_machine
from attnzoo.utils.random_weights import randomize_


def error(model, reference, x, train: bool) -> float:
    torch.manual_seed(123)
    with torch.no_grad():
        got = model.train(train)(x)
        expected = reference.train(train)(x)
    got = got[0] if isinstance(got, tuple) else got
    return float((got - expected).abs().max() / expected.abs().max())


def check(net: str, name: str, init: str, state, x) -> str:
    torch.manual_seed(1)
    try:
        model = attnzoo.create_model(net, num_classes=10, attention=name, attention_init=init)
    except ValueError:
        return "refused"
    target = model.backbone if attention_level(name) == "model" else model
    target.load_state_dict(state, strict=False)
    reference = attnzoo.create_model(net, num_classes=10)
    reference.load_state_dict(state)
    worst = max(error(model, reference, x, train) for train in (False, True))
    return f"{worst:.1e}" if worst else "0"


def main(nets: list[str]) -> None:
    torch.set_num_threads(1)
    print(f"CPU: {describe_machine()}\n")
    print("| attention | " + " | ".join(f"{n} identity | {n} default" for n in nets) + " |")
    print("|---" * (1 + 2 * len(nets)) + "|")
    plain = {}
    for net in nets:
        torch.manual_seed(0)
        plain[net] = (
            randomize_(attnzoo.create_model(net, num_classes=10)).state_dict(),
            torch.randn(4, 3, 32, 32),
        )
    for name in attnzoo.list_attentions():
        cells = []
        for net in nets:
            state, x = plain[net]
            cells += [check(net, name, "identity", state, x), check(net, name, "default", state, x)]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["resnet20", "resnet50"])
