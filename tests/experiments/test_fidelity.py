"""Fidelity of the table specs to the papers (issue 17): FLOPs against the papers' columns,
the STL-10 structure, RCCA's placement, per-row recipes, metrics, and the ImageNet column."""

from __future__ import annotations

import json

import pytest
import torch

import attnzoo
from attnzoo.experiments import list_tables, load_table, spec
from attnzoo.experiments.report import RowResult, RunResult, apply_metric, render_markdown
from attnzoo.experiments.reproduce import plan_runs
from attnzoo.experiments.spec import FLOPS_TOLERANCE_PCT, load_module_params, params_notes
from attnzoo.measure import count_flops, count_params
from attnzoo.utils.io import read_yaml_mapping

FLOPS_TABLES = [k for k in list_tables() if load_table(k).paper_gflops]


def macs_g(row) -> float:
    """Forward MACs (G) of a row's network on one image, counted on the meta device (shapes
    only: no arithmetic is done, so a ResNet-101 costs milliseconds)."""
    with torch.device("meta"):
        model = attnzoo.create_model(
            row.model,
            num_classes=row.num_classes,
            attention=row.attention,
            attention_kwargs=row.attention_kwargs,
            **row.model_kwargs,
        )
        x = torch.empty(1, 3, row.input_size, row.input_size)
    return count_flops(model, x) / 2e9


def test_the_flops_tables():
    assert {"ham_table4", "ham_table5", "ham_table6", "gam_table1", "gam_table2"} <= set(
        FLOPS_TABLES
    )


@pytest.mark.parametrize("key", FLOPS_TABLES)
def test_flops_stay_within_the_documented_tolerance(key):
    """Every row within 5% of the paper's FLOPs column, or within the tolerance of the note
    that explains it; and a note covers only rows that need it."""
    table = load_table(key)
    off = []
    for row in table.rows:
        paper = table.paper_macs(row)
        if paper is None:
            continue
        diff = 100 * (macs_g(row) - paper) / paper
        notes = table.flops_notes_for(row.name)
        tolerance = max([n.tolerance_pct for n in notes], default=FLOPS_TOLERANCE_PCT)
        if abs(diff) > tolerance:
            off.append(f"{row.name}: {diff:+.1f}% (tolerance {tolerance}%)")
        if notes and abs(diff) <= FLOPS_TOLERANCE_PCT:
            off.append(f"{row.name}: {diff:+.1f}% needs no note {[n.id for n in notes]}")
    assert not off, f"{key}: " + "; ".join(off)


def test_flops_notes_have_their_text_once():
    notes = params_notes(kind="flops_notes")
    assert {"rcca-flops", "eca-bottleneck-flops", "mobilenet-flops"} <= set(notes)
    assert all(n.title and n.text for n in notes.values())


def test_meta_device_counts_what_a_real_forward_counts():
    row = next(r for r in load_table("ham_table6").rows if r.name == "ResNet50 + HAM")
    model = attnzoo.create_model(row.model, num_classes=10, attention="ham", **row.model_kwargs)
    real = count_flops(model, torch.randn(1, 3, 96, 96)) / 2e9
    assert macs_g(row) == pytest.approx(real, rel=1e-9)


# ------------------------------------------------------------------ STL-10 structure


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_stl10_stem_keeps_the_parameters_and_halves_the_maps(name):
    plain = attnzoo.create_model(name, num_classes=10, stem="cifar", shortcut="A")
    stl = attnzoo.create_model(
        name, num_classes=10, stem="cifar_pool", shortcut="A", bottleneck_stride="1x1"
    )
    assert count_params(plain) == count_params(stl)
    assert stl.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(2, 3, 96, 96)
    assert stl.forward_stem(x).shape[-2:] == (48, 48)
    assert plain.forward_stem(x).shape[-2:] == (96, 96)
    assert stl.eval()(x).shape == (2, 10)


def test_bottleneck_stride_on_the_first_1x1_conv():
    v1 = attnzoo.create_model("resnet50", bottleneck_stride="1x1")
    v15 = attnzoo.create_model("resnet50")
    block, ref = v1.layer2[0], v15.layer2[0]
    assert (block.conv1.stride, block.conv2.stride) == ((2, 2), (1, 1))
    assert (ref.conv1.stride, ref.conv2.stride) == ((1, 1), (2, 2))
    v1.load_state_dict(v15.state_dict())  # same parameters, same names
    assert v1.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
    with pytest.raises(ValueError, match="unknown bottleneck_stride '2x2'; choose one of"):
        attnzoo.create_model("resnet50", bottleneck_stride="2x2")
    with pytest.raises(ValueError, match="bottleneck_stride"):
        attnzoo.create_model("resnext29_8x64d", bottleneck_stride="3x1")


def test_stl10_rows_use_the_structure_the_flops_imply():
    for key in ("ham_table5", "ham_table6"):
        for row in load_table(key).rows:
            assert row.model_kwargs["stem"] == "cifar_pool", row.name
            assert row.model_kwargs["bottleneck_stride"] == "1x1", row.name


def test_rcca_rows_are_one_module_on_the_last_map():
    rows = [
        (key, row)
        for key in ("ham_table2", "ham_table4", "ham_table5", "ham_table6")
        for row in load_table(key).rows
        if row.attention == "rcca"
    ]
    assert len(rows) == 14
    for key, row in rows:
        assert row.model_kwargs.get("placement") == "final", (key, row.name)
    # merged into the table's defaults, not replacing them
    stl = next(r for k, r in rows if k == "ham_table6")
    assert stl.model_kwargs["stem"] == "cifar_pool"
    wrn = next(r for k, r in rows if "WideResNet16" in r.name)
    assert wrn.model_kwargs == {"shortcut": "A", "placement": "final"}


# ------------------------------------------------------------------ recipes per row


def test_rows_train_with_the_papers_recipe_and_batch():
    gam = load_table("gam_table2")
    mobile = [r for r in gam.rows if r.model == "mobilenet_v2"]
    assert len(mobile) == 5 and all(r.recipe == "gam_mobilenet" for r in mobile)
    gam_row = next(r for r in mobile if r.attention == "gam")
    assert gam_row.attention_kwargs == {"pool": True}  # as the ResNet rows
    abn = [r for r in gam.rows if r.attention == "abn"]
    assert [r.attention_kwargs for r in abn] == [{"map_kernel_size": 3}] * 2
    resnext = [r for r in load_table("ham_table4").rows if r.model == "resnext29_8x64d"]
    assert len(resnext) == 6 and all(r.recipe_overrides == {"batch_size": 64} for r in resnext)


def test_abn_rows_fit_the_parameter_column_with_the_3x3_map_conv():
    for row in (r for r in load_table("gam_table2").rows if r.attention == "abn"):
        with torch.device("meta"):
            model = attnzoo.create_model(
                row.model, attention="abn", attention_kwargs=row.attention_kwargs
            )
        assert round(count_params(model) / 1e6, 2) == row.paper["params_m"], row.name


def test_reproduce_applies_a_rows_recipe_overrides(tmp_path):
    _, runs = plan_runs("ham_table4", ["ResNeXt29(8x64d)", "ResNet20"], epochs=2, out=tmp_path)
    batch = {run.row.name: run.cfg.batch_size for run in runs}
    assert batch == {"ResNeXt29(8x64d)": 64, "ResNet20": 128}
    _, runs = plan_runs("bridge_table1", ["ResNet50"], budget=1.0, out=tmp_path)
    assert runs[0].cfg.epochs == 25  # the paper's 25-epoch run, the recipe's 150 otherwise
    _, runs = plan_runs("bridge_table1", ["ResNet50"], budget=0.2, out=tmp_path)
    assert runs[0].cfg.epochs == 5


def test_the_imagenet_column_runs_an_imagenet_model_and_recipe(tmp_path):
    _, runs = plan_runs(
        "spatial_softmax_table1", ["Ours"], dataset="imagenet", epochs=1, out=tmp_path
    )
    cfg = runs[0].cfg
    assert (cfg.model, cfg.recipe, cfg.batch_size, cfg.dataset) == (
        "resnet50", "spatial_softmax_imagenet", 256, "imagenet",
    )  # fmt: skip
    assert cfg.milestones == pytest.approx([1 / 3, 2 / 3], abs=1e-5) and cfg.gamma == 0.1
    with pytest.raises(ValueError, match="has no ImageNet model.*--model"):
        plan_runs("spatial_softmax_table1", ["DenseNet-BC"], dataset="imagenet", out=tmp_path)
    _, runs = plan_runs(
        "spatial_softmax_table1", ["Ours"], dataset="cifar10", epochs=1, out=tmp_path
    )
    assert (runs[0].cfg.model, runs[0].cfg.recipe) == ("resnet110", "spatial_softmax")


# ------------------------------------------------------------------ metrics


def run_result(seed: int, errors: list[float]) -> RunResult:
    return RunResult(
        seed=seed,
        dataset="cifar10",
        epochs=len(errors),
        top1=errors[-1],
        top5=1.0,
        params=1000,
        curve=[100 - e for e in errors],
        top5_curve=[1.0] * len(errors),
    )


def test_mean_over_epochs_metric():
    run = apply_metric(run_result(0, [30.0, 20.0, 10.0]), "mean_over_epochs")
    assert run.top1 == pytest.approx(20.0)
    assert apply_metric(run_result(0, [30.0, 20.0, 10.0]), "final").top1 == 10.0
    se = next(r for r in load_table("bridge_table1").rows if r.name == "SENet")
    assert se.metric == "mean_over_epochs"


def test_report_shows_best_of_n_beside_the_mean(tmp_path):
    table = load_table("ham_table4")
    results = []
    for row, errors in ((table.rows[0], (9.0, 8.0, 7.0)), (table.rows[1], (8.5, 8.0, 6.0))):
        result = RowResult(row, row.name.lower())
        result.runs = [run_result(s, [e + 5, e]) for s, e in enumerate(errors)]
        results.append(result)
    text = render_markdown("ham_table4", results, tmp_path, ("c.png", "e.png"))
    header = next(line for line in text.splitlines() if line.startswith("| row |"))
    assert "best of n" in header
    first = next(line for line in text.splitlines() if line.startswith("| ResNet20 |"))
    cells = [c.strip() for c in first.strip("|").split("|")]
    assert cells[3] == "8.00 ± 1.00" and cells[4] == "7.00"


# ------------------------------------------------------------------ spec files


def test_a_key_given_twice_in_a_spec_is_an_error(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("rows:\n- name: a\n  model_kwargs: {x: 1}\n  model_kwargs: {y: 2}\n")
    with pytest.raises(ValueError, match="key 'model_kwargs' given twice"):
        read_yaml_mapping(path, ValueError, "table")


def test_citations_name_the_papers_authors():
    """Checked against ../shared/papers (issue 17: HAM's authors were written from memory)."""
    import attnzoo.attention.ham as ham

    first = ham.__doc__.splitlines()[0]
    for author in ("Li", "Fang", "Zha", "Gao", "Zheng"):
        assert author in first, first
    assert "Yang" not in first
    spec = load_table("ham_table4").paper
    assert json.dumps(spec)  # a string, cited as in the paper


def test_plan_records_a_rows_own_run_length(tmp_path):
    """seed 002's ResNet-50 row is a 25-epoch run: its full budget is 25, not the recipe's 150."""
    from attnzoo.experiments.reproduce import reproduce

    _, runs = plan_runs("bridge_table1", ["ResNet50"], budget=0.2, out=tmp_path)
    assert runs[0].recipe_epochs == 25
    with pytest.raises(KeyboardInterrupt):  # stop before any training: the plan is written
        reproduce(
            "bridge_table1", ["ResNet50"], budget=0.2, out=tmp_path, dataset="digits",
            log=lambda m: (_ for _ in ()).throw(KeyboardInterrupt) if m.startswith("[") else None,
        )  # fmt: skip
    plan = json.loads((tmp_path / "bridge_table1" / "plan.json").read_text())
    entry = plan["rows"]["resnet50"]
    assert (entry["recipe_epochs"], entry["epochs"], entry["budget"]) == (25, 5, 0.2)


def test_detectable_difference_and_seeds_needed():
    from attnzoo.experiments.report import detectable_difference, paired, seeds_needed

    # t_0.975 + t_0.8 with 2 degrees of freedom: 4.303 + 1.061 = 5.364
    assert detectable_difference(1.0, 3) == pytest.approx(5.364 / 3**0.5, rel=1e-3)
    n = seeds_needed(0.5, 0.3)
    assert detectable_difference(0.5, n) <= 0.3 < detectable_difference(0.5, n - 1)
    assert seeds_needed(0.0, 0.3) == 2
    base, row = RowResult(None, "a"), RowResult(None, "b")
    base.runs = [run_result(s, [e]) for s, e in enumerate((9.0, 8.0, 7.0))]
    row.runs = [run_result(s, [e]) for s, e in enumerate((8.5, 8.0, 6.0))]
    p = paired(base, row)
    assert p["detectable"] == pytest.approx(detectable_difference(p["std"], 3))
    assert p["seeds_needed"] == seeds_needed(p["std"], 0.3)


MODULE_PARAMS = load_module_params()


@pytest.mark.parametrize("row", MODULE_PARAMS, ids=[r.name for r in MODULE_PARAMS])
def test_zoo_modules_match_their_own_papers(row):
    """The zoo modules' published counts (experiments/zoo/module_params.yaml): parameters
    within 0.5% (or to the paper's two decimals), MACs within 1% where given."""
    macs = macs_g(row)
    with torch.device("meta"):
        model = attnzoo.create_model(
            row.model, num_classes=row.num_classes, attention=row.attention,
            attention_kwargs=row.attention_kwargs, **row.model_kwargs,
        )  # fmt: skip
    params_m = count_params(model) / 1e6
    assert abs(params_m / row.paper_params_m - 1) < 0.005, (params_m, row.paper_params_m)
    if row.paper_gmacs:
        assert abs(macs / row.paper_gmacs - 1) < 0.01, (macs, row.paper_gmacs)


def test_module_params_rows_are_checked(monkeypatch):
    assert {r.attention for r in MODULE_PARAMS} >= {"sk", "splat", "epsa", "sge", "shuffle"}
    monkeypatch.setattr(
        spec, "read_yaml_mapping", lambda *a: {"rows": [{"name": "x", "paperr": 1}]}
    )
    with pytest.raises(ValueError, match=r"row 1: unknown key\(s\) \['paperr'\]"):
        load_module_params()
