"""compare: planted faults are localised and cured, golden files round-trip, exit codes gate CI."""

from __future__ import annotations

import json
import sys

import pytest

import vitport
from vitport.compare.run import CompareResult, candidate_factory, compare
from vitport.compare.verdict import thresholds_for
from vitport.device import resolve_device
from vitport.errors import GoldenMismatchError
from vitport.fixes import fix_names
from vitport.infer import infer
from vitport.runtimes import Setup

CPU = resolve_device("cpu")


def run_compare(base, photos, fault=None, dtype="fp32", reference=None, **kwargs):
    make = candidate_factory(base, CPU, Setup(dtype=dtype), fault)
    candidate, _ = make([])
    return compare(
        base,
        candidate,
        reference if reference is not None else base,
        photos,
        thresholds_for(dtype),
        make_candidate=make,
        **kwargs,
    )


@pytest.mark.parametrize(
    ("family", "fault", "culprit", "cure"),
    [
        ("dinov2", "gelu-tanh@1", "encoder.layer.1.mlp", "erf-gelu"),
        ("dinov2", "layernorm-bf16@0", "encoder.layer.0.norm1", "layernorm-fp32"),
        ("vit", "layernorm-bf16@1", "layers.1.layernorm_before", "layernorm-fp32"),
        ("dinov3_vit", "gelu-tanh@0", "model.layer.0.mlp", "erf-gelu"),
        ("timm_vit_reg4", "gelu-tanh@1", "blocks.1.mlp", "erf-gelu"),
    ],
)
def test_planted_fault_is_localised_and_cured(family, fault, culprit, cure, tiny_dir, photos):
    base = vitport.load(str(tiny_dir(family)))
    result = run_compare(
        base, photos, fault=fault, localize_points=True, trial_fixes=[(n,) for n in fix_names()]
    )
    assert result.localization.culprit == culprit, result.localization.reason
    block = int(fault.split("@")[1])
    points = result.localization.points
    assert next(p for p in points if p.name == culprit).local > 0
    assert all(p.local == 0 for p in points if p.block != block)  # teacher forcing: no spill
    assert any(p.accumulated > 0 for p in points if p.block is not None and p.block > block) or (
        block == max(p.block for p in points if p.block is not None)
    )
    assert result.best_trial().fixes == (cure,)
    cured = next(t for t in result.trials if t.fixes == (cure,))
    assert max(g.worst["rel_error"] for g in cured.groups.values()) == 0
    together = result.trials[-1]
    assert len(together.fixes) > 1 and together.verdict


def test_clean_port_has_no_culprit_and_floor_is_measured(tiny_dir, photos):
    base = vitport.load(str(tiny_dir("dinov2")))
    result = run_compare(base, photos, dtype="bf16", localize_points=True)
    assert result.localization.culprit is None
    assert "spread evenly" in result.localization.reason
    for name, group in result.groups.items():
        assert group.worst["rel_error"] > 0
        assert 0 < result.floor[name].mean["rel_error"] < group.mean["rel_error"]
        assert result.floor_ratio[name]["rel_error"] > 1


def test_aimv2_has_no_gelu_and_says_so(tiny_dir, photos):
    base = vitport.load(str(tiny_dir("aimv2")))
    result = run_compare(base, photos, trial_fixes=[("erf-gelu",), ("layernorm-fp32",)])
    gelu, norm = result.trials[:2]
    assert gelu.groups is None and "changed nothing" in gelu.detail
    assert norm.groups is not None


def test_result_round_trips_through_json(tiny_dir, photos):
    base = vitport.load(str(tiny_dir("vit_classifier")))
    result = run_compare(
        base, photos, fault="gelu-tanh@0", localize_points=True, trial_fixes=[("erf-gelu",)]
    )
    data = json.loads(json.dumps(result.to_dict()))
    back = CompareResult.from_dict(data)
    assert back.to_dict() == result.to_dict()
    assert "logits" in data["groups"] and "top1" in data["groups"]["logits"]["batch"]
    assert data["schema_version"] == 1


def test_golden_round_trip_and_mismatches(tiny_dir, photos, tmp_path):
    base = vitport.load(str(tiny_dir("dinov2")))
    golden = infer(base, photos).features
    golden.save(tmp_path / "g.safetensors")
    loaded = vitport.Features.load(tmp_path / "g.safetensors")
    result = run_compare(base, photos, reference=loaded)
    assert result.passed and result.reference.kind == "golden"
    assert result.groups["cls"].worst["rel_error"] < 1e-5  # batch 1 vs 4: summation order only

    other = vitport.load(str(tiny_dir("dinov2_with_registers")))
    with pytest.raises(GoldenMismatchError, match="another model"):
        run_compare(other, photos, reference=loaded)
    with pytest.raises(GoldenMismatchError, match="other images"):
        run_compare(base, photos[:2], reference=loaded)
    bigger = vitport.load(str(tiny_dir("dinov2")), image_size=42)
    with pytest.raises(GoldenMismatchError, match="other preprocessing"):
        run_compare(bigger, photos, reference=loaded)


def cli(monkeypatch, capsys, *args):
    from vitport.cli import main

    monkeypatch.setattr(sys, "argv", ["vitport", *args])
    monkeypatch.setenv("COLUMNS", "200")
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_exit_codes_gate_ci(monkeypatch, capsys, tiny_dir, tmp_path):
    model = str(tiny_dir("vit"))
    report = tmp_path / "c.json"
    code, out, err = cli(
        monkeypatch,
        capsys,
        "compare",
        "--model",
        model,
        "--device",
        "cpu",
        "--dtype",
        "bf16",
        "--json",
        str(report),
    )
    assert code == 0, err
    assert "PASS" in out and "x floor" in out
    assert json.loads(report.read_text())["passed"] is True
    code, out, _ = cli(
        monkeypatch,
        capsys,
        "compare",
        "--model",
        model,
        "--device",
        "cpu",
        "--dtype",
        "bf16",
        "-t",
        "rel_error=1e-9",
    )
    assert code == 1 and "FAIL" in out and "needs < 1e-07%" in out  # limits in their unit
    code, _, err = cli(monkeypatch, capsys, "compare", "--model", model, "-t", "bogus=1")
    assert code == 2 and len(err.strip().splitlines()) == 1
    code, _, err = cli(monkeypatch, capsys, "compare", "--model", model, "--fix", "nope")
    assert code == 2 and "erf-gelu" in err


def test_cli_golden_from_another_machine(monkeypatch, capsys, tiny_dir, tmp_path):
    """infer --out on machine A (default inputs), compare --reference on machine B."""
    model = str(tiny_dir("dinov2"))
    golden = tmp_path / "a.safetensors"
    code, _, err = cli(monkeypatch, capsys, "infer", "--model", model, "--out", str(golden))
    assert code == 0, err
    code, out, err = cli(
        monkeypatch,
        capsys,
        "compare",
        "--model",
        model,
        "--device",
        "cpu",
        "--reference",
        str(golden),
    )
    assert code == 0, err
    title = " ".join(out.split())  # the title wraps at the table's width, by path length
    assert "golden file" in title and "10 inputs" in title
    code, out, err = cli(
        monkeypatch,
        capsys,
        "compare",
        "--model",
        model,
        "--device",
        "cpu",
        "--reference",
        str(golden),
        "--localize",
    )
    assert code == 2 and "holds final outputs only" in err and "--with-blocks" in err


def test_identical_candidate_is_said_to_agree_exactly(tiny_dir, photos):
    base = vitport.load(str(tiny_dir("vit")))
    result = run_compare(base, photos[:2], localize_points=True)
    assert result.localization.culprit is None
    assert result.localization.reason == "candidate and reference agree exactly at every point"


def test_improvement_wording():
    from vitport.format import improvement

    assert improvement(0.0, 0.0) == "-"
    assert improvement(0.01, 0.0) == "exact"
    assert improvement(0.0, 1e-6) == "worse"
    assert improvement(0.01, 0.001) == "10x"


def test_cli_per_input_table(monkeypatch, capsys, tiny_dir):
    model = str(tiny_dir("vit"))
    code, out, _ = cli(
        monkeypatch,
        capsys,
        "compare",
        "--model",
        model,
        "--device",
        "cpu",
        "--dtype",
        "bf16",
        "--per-input",
        "--batch-size",
        "2",
    )
    assert code == 0
    assert "per input" in out and "random:0:1:224" in out and "skimage:astronaut" in out


def test_fix_trials_leave_process_settings_as_they_were(tiny_dir, photos):
    import torch

    before = torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()
    torch.backends.cudnn.allow_tf32 = True
    try:
        base = vitport.load(str(tiny_dir("vit")))
        result = run_compare(base, photos[:2], trial_fixes=[("no-tf32",)])
        assert "cudnn.allow_tf32" in result.trials[0].detail
        assert torch.backends.cudnn.allow_tf32 is True
    finally:
        torch.backends.cudnn.allow_tf32 = before[0]
        torch.set_float32_matmul_precision(before[1])


def test_only_the_culprit_block_is_highlighted():
    from types import SimpleNamespace

    from vitport.cli.tables import localization_table
    from vitport.compare.localize import Localization, PointError

    points = [
        PointError(f"encoder.layer.{i}", i, "block", 0.1, 0.1 if i == 10 else 0.0, 0.0, 0.0)
        for i in range(12)
    ]
    loc = Localization(points, culprit="encoder.layer.10.mlp", reason="")
    table = localization_table(SimpleNamespace(localization=loc, localization_reference="cpu"))
    styled = [i for i, row in enumerate(table.rows) if row.style]
    assert styled == [10]


def test_floor_is_what_the_candidates_dtype_costs(tiny_dir, photos):
    """bf16 is set against the error that rounding weights and input to bf16 costs, not fp32's."""
    base = vitport.load(str(tiny_dir("dinov2")))
    fp32 = run_compare(base, photos)
    bf16 = run_compare(base, photos, dtype="bf16")
    assert (fp32.floor_dtype, bf16.floor_dtype) == ("fp32", "bf16")
    assert fp32.floor == fp32.floor_fp32  # fp32's floor is fp32 against fp64, as before
    assert bf16.floor_fp32 == fp32.floor  # and bf16 keeps it beside its own
    assert "rounded to bf16" in bf16.floor_kind and "fp32 and fp64" in fp32.floor_kind
    for name in bf16.groups:
        assert bf16.floor[name].mean["rel_error"] > 100 * fp32.floor[name].mean["rel_error"]
        assert 1 <= bf16.floor_ratio[name]["rel_error"] < 100, name
    back = CompareResult.from_dict(json.loads(json.dumps(bf16.to_dict())))
    assert back.floor == bf16.floor and back.floor_fp32 == bf16.floor_fp32
    assert back.floor_dtype == "bf16"


def test_older_json_without_the_dtype_floor_still_reads(tiny_dir, photos):
    base = vitport.load(str(tiny_dir("vit")))
    data = run_compare(base, photos[:2]).to_dict()
    for key in ("floor_fp32", "floor_dtype", "floor_kind"):
        del data[key]
    back = CompareResult.from_dict(data)
    assert back.floor_dtype == "fp32" and back.floor_fp32 == back.floor


def test_cli_tables_give_relative_errors_in_percent(monkeypatch, capsys, tiny_dir):
    model = str(tiny_dir("vit"))
    code, out, err = cli(
        monkeypatch,
        capsys,
        "--wide",
        "compare",
        "--model",
        model,
        "--device",
        "cpu",
        "--inject-fault",
        "gelu-tanh@1",
        "--localize",
        "--try-fixes",
    )
    assert code in (0, 1), err
    for header in ("vec rel worst (%)", "floor rel err (%)", "accumulated (%)", "local (%)"):
        assert header in out, header
    assert "relative error in % (worst input)" in out and "best fix: --fix erf-gelu" in out


def test_judging_reads_data_only_and_the_steps_make_compares_result(tiny_dir, photos):
    """Running apart from judging: a run's Features judged as data (a known relative error
    planted in them), and the steps one by one give what compare() gathers."""
    import dataclasses

    import torch

    from vitport.compare.floors import measure_floors
    from vitport.compare.judge import judge_run
    from vitport.compare.sides import run_sides

    base = vitport.load(str(tiny_dir("vit")))
    said: list[str] = []
    run = run_sides(base, base, photos[:2], progress=said.append)
    assert said == ["reference on cpu (fp32)", "candidate on cpu (fp32)"]
    assert run.reference.kind == run.candidate.kind == "run" and len(run.names) == 2
    floors = measure_floors(base, photos[:2], torch.float32, fp32=run.reference_features)
    assert floors.dtype == "fp32" and floors.floor is floors.fp32
    feats = run.candidate_features
    scaled = dataclasses.replace(feats, cls=feats.cls * 1.02)  # rel_error of cls: 2 %
    judged = judge_run(dataclasses.replace(run, candidate_features=scaled), floors, [])
    assert judged.groups["cls"].worst["rel_error"] == pytest.approx(0.02, rel=1e-4)
    assert judged.groups["patches"].worst["rel_error"] == 0.0
    assert not judged.verdict  # no limits: no check, so no pass
    tight = thresholds_for("fp32")
    assert not judge_run(dataclasses.replace(run, candidate_features=scaled), floors, tight).verdict
    assert judge_run(run, floors, tight).verdict

    result = compare(base, base, base, photos[:2], tight)
    assert result.groups["cls"].worst == judge_run(run, floors, tight).groups["cls"].worst
    assert result.floor["cls"].worst == floors.floor["cls"].worst
    assert result.inputs == list(run.names)


def test_one_check_for_every_reference_kind(tiny_dir, tmp_path):
    """compare.check assembles a device, a golden file and an msprobe dump alike (reference,
    inputs, limits), as compare, report and serve use it; a wrong reference is refused there,
    before anything runs."""
    import torch

    from vitport.compare.check import DUMP_BRINGS_INPUTS, assemble_check, check_inputs, open_source
    from vitport.compare.run import run_check
    from vitport.compare.sides import pixel_batches
    from vitport.compare.verdict import Threshold
    from vitport.device import Device
    from vitport.errors import VitportError
    from vitport.inputs import PixelInputs, random_images, sample_images
    from vitport.msprobe import write_dump

    base = vitport.load(str(tiny_dir("dinov2")))
    images = [*sample_images(2), *random_images(2, size=40)]  # recreated by their names
    golden = tmp_path / "golden.safetensors"
    infer(base, images).features.save(golden)
    dump = write_dump(base, pixel_batches(base, images, 2), tmp_path / "dump")

    sources = {"run": "cpu", "golden": str(golden), "msprobe": str(dump)}
    limit = Threshold("rel_error", 0.05)
    for kind, reference in sources.items():
        source = open_source(reference)
        check = assemble_check(base, source, torch.float32, overrides=[limit])
        assert check.kind == kind
        assert check.thresholds[0] == limit and limit not in thresholds_for("fp32")
        names = [im.name for im in images]
        if kind == "msprobe":
            assert isinstance(check.inputs, PixelInputs) and len(check.inputs) == 4
        elif kind == "golden":
            assert [im.name for im in check.inputs] == names
        else:
            assert isinstance(source, Device) and len(check.inputs) > 4  # the default set
        result = run_check(base, base.to(copy=True), check)
        assert result.passed and result.reference.kind == kind, kind

    other = vitport.load(str(tiny_dir("dinov2_with_registers")))
    with pytest.raises(GoldenMismatchError, match="another model"):
        assemble_check(other, open_source(str(golden)), torch.float32)
    with pytest.raises(VitportError, match="brings its own inputs"):
        check_inputs(open_source(str(dump)), images)
    assert "brings its own inputs" in DUMP_BRINGS_INPUTS


def test_each_side_is_described_by_a_setup(tiny_dir, photos):
    """A side holds a Setup (runtime, dtype, fixes); compare's JSON keeps its flat fields."""
    base = vitport.load(str(tiny_dir("vit")))
    result = run_compare(base, photos[:2], dtype="bf16", fixes=["layernorm-fp32"])
    assert result.candidate.setup == Setup(dtype="bf16", fixes=("layernorm-fp32",))
    assert result.reference.setup == Setup() and result.reference.kind == "run"
    data = result.to_dict()["candidate"]
    assert list(data) == ["kind", "device", "dtype", "fixes", "path", "description", "runtime"]
    assert data["dtype"] == "bf16" and data["fixes"] == ["layernorm-fp32"]
    again = CompareResult.from_dict(json.loads(json.dumps(result.to_dict())))
    assert again.candidate == result.candidate and again.reference == result.reference
