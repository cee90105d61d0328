"""attnzoo/train/ema.py: a weight EMA (BN buffers averaged too), evaluated and saved."""

from __future__ import annotations

import pytest
import torch
from option_helpers import tiny_config, tiny_trainer
from safetensors.torch import load_file

from attnzoo.train.ema import build_ema


def test_off_by_default():
    assert build_ema(torch.nn.Linear(2, 2), 0.0) is None


def test_ema_after_three_engine_steps_is_the_hand_computed_average(tmp_path):
    decay = 0.75
    trainer = tiny_trainer(tmp_path, ema_decay=decay, train_subset=96)  # 3 steps
    snapshots = []
    step = trainer.optimizer.step

    def step_and_record(*args, **kwargs):
        result = step(*args, **kwargs)
        snapshots.append({k: v.clone() for k, v in trainer.model.state_dict().items()})
        return result

    trainer.optimizer.step = step_and_record
    trainer.train_epoch()
    assert len(snapshots) == 3
    got = trainer.ema.module.state_dict()
    for name, value in got.items():
        w1, w2, w3 = (s[name] for s in snapshots)
        if not value.is_floating_point():  # num_batches_tracked: averaged in integers
            continue
        want = decay * (decay * w1 + (1 - decay) * w2) + (1 - decay) * w3
        torch.testing.assert_close(value, want, rtol=1e-6, atol=1e-7, msg=name)
    assert "bn1.running_mean" in got  # BN statistics are averaged like the weights
    assert int(trainer.ema.n_averaged) == 3


def test_ema_is_evaluated_beside_the_raw_weights_and_saved(tmp_path):
    trainer = tiny_trainer(tmp_path, ema_decay=0.9)
    trainer.out.mkdir()
    summary = trainer.fit(log=lambda message: None)
    row = trainer.metrics[0]
    assert {"test_loss_ema", "test_top1_err_ema", "test_top5_err_ema"} <= set(row)
    assert summary["final_top1_err_ema"] == row["test_top1_err_ema"]
    ema = load_file(str(trainer.out / "model_ema.safetensors"))
    raw = load_file(str(trainer.out / "model.safetensors"))
    assert ema.keys() == raw.keys()
    assert any(not torch.equal(ema[k], raw[k]) for k in raw)
    assert torch.equal(ema["fc.weight"], trainer.ema.module.fc.weight)


@pytest.mark.parametrize("decay", [1.0, -0.1, float("nan"), True, "0.9"])
def test_bad_decay_is_refused(decay):
    with pytest.raises(ValueError, match=r"ema_decay must be in \[0, 1\)"):
        build_ema(torch.nn.Linear(2, 2), decay)


def test_eval_reads_the_ema_weights(tmp_path, capsys):
    from attnzoo.cli import main
    from attnzoo.train import RunError, evaluate_run, train

    run = tmp_path / "ema"
    summary = train(tiny_config(ema_decay=0.9), run, log=lambda message: None)
    assert evaluate_run(run, ema=True)["test_top1_err"] == summary["final_top1_err_ema"]
    assert evaluate_run(run)["test_top1_err"] == summary["final_top1_err"]
    assert main(["eval", "--run", str(run), "--ema"]) == 0
    assert "(EMA weights)" in capsys.readouterr().out
    plain = tmp_path / "plain"
    train(tiny_config(), plain, log=lambda message: None)
    with pytest.raises(RunError, match="without a weight EMA.*without --ema"):
        evaluate_run(plain, ema=True)


def test_weight_ema_is_bitwise_torchs_averaged_model_and_resumes():
    # WeightEma keeps its update count on the host (no per-step synchronisation on a GPU);
    # its averages must stay torch's AveragedModel's exactly, also after a state round trip.
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from attnzoo import create_model
    from attnzoo.train.ema import WeightEma

    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10, attention="se")
    ours = WeightEma(model, 0.9)
    torchs = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    resumed = None
    for step in range(5):
        loss = model(torch.randn(4, 3, 16, 16)).square().mean()  # BN buffers move too
        opt.zero_grad()
        loss.backward()
        opt.step()
        for ema in (ours, torchs, resumed):
            if ema is not None:
                ema.update_parameters(model)
        if step == 2:
            resumed = WeightEma(create_model("resnet20", num_classes=10, attention="se"), 0.9)
            resumed.load_state_dict(ours.state_dict())
            assert resumed.updates == 3
    for ema in (ours, resumed):
        a, b = ema.state_dict(), torchs.state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), [
            k for k in a if not torch.equal(a[k], b[k])
        ]
    # and the average moved away from the first weights (the test can fail)
    first = create_model("resnet20", num_classes=10, attention="se")
    assert not torch.equal(ours.module.fc.weight, first.fc.weight)
