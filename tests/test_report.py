"""report: every section from the run's numbers, plots, --from, and the same numbers in en and zh."""

from __future__ import annotations

import json
import re
import sys

import pytest
from PIL import Image

from vitport.bench.run import Window
from vitport.format import pct
from vitport.inputs import sample_images
from vitport.report import ReportOptions, build_report, read_report, write_report
from vitport.report.plots import DPI, FIGSIZE

QUICK = Window(warmup_iters=1, warmup_seconds=0.0, min_iters=3, min_seconds=0.0)
SECTIONS = [
    "1. Introduction",
    "2. Environment",
    "3. Weights",
    "4. Dependencies",
    "5. Inference sample",
    "6. Performance",
    "7. Accuracy",
    "8. Precision fixes",
    "9. Error by block",
    "10. Notes",
]


@pytest.fixture(scope="module")
def data(tiny_dir):
    options = ReportOptions(
        str(tiny_dir("vit_classifier")),
        "cpu",
        "bf16",
        batch_sizes=(1, 2),
        window=QUICK,
        optimize=True,
    )
    return build_report(options, sample_images(4))


def decimals(text: str) -> list[str]:
    return sorted(re.findall(r"-?\d+\.\d+(?:e-?\d+)?%?", text))


def test_every_section_with_numbers_from_the_run(data, tmp_path):
    readme = write_report(data, tmp_path).read_text()
    for title in SECTIONS:
        assert f"## {title}" in readme
    first_lines = readme.splitlines()[2:4]
    assert first_lines[0].startswith("- **Faithful**") or first_lines[0].startswith(
        "- **Not faithful**"
    )
    assert "img/s" in first_lines[1]
    assert "Fastest faithful configuration" in readme
    runtimes = {t["config"]["runtime"] for t in data["optimize"]["trials"]}
    assert "torch" in runtimes and "| runtime |" in readme
    assert any(f"| {r} |" in readme for r in runtimes - {"torch"}) or runtimes == {"torch"}
    assert "runtime skipped: tensorrt" in readme
    best = data["optimize"]["best"]
    assert f"at batch {best['batch_size']}," in readme
    for row in data["bench"]["rows"]:
        assert f"| {row['batch_size']} | {row['p50_ms']:.2f} |" in readme
    cls = data["compare"]["groups"]["cls"]["worst"]["rel_error"]
    assert pct(cls) in readme
    assert f"{data['model']['params'] / 1e6:.2f}M" in readme
    assert data["model"]["weights_sha256"] in readme
    assert "logits" in data["inference"]["shapes"] and "| logits | 1 x 10 |" in readme
    for name in ("report.json", "inference.json", "bench.json", "compare.json", "report.log"):
        assert (tmp_path / name).stat().st_size > 0
    assert json.loads((tmp_path / "report.json").read_text())["schema_version"] == 1
    assert isinstance(data["warnings"], list)


def test_plots_open_with_the_expected_size(data, tmp_path):
    write_report(data, tmp_path)
    for name in ("performance.png", "block_errors.png", "patch_error.png"):
        with Image.open(tmp_path / name) as image:
            assert image.size == (int(FIGSIZE[0] * DPI), int(FIGSIZE[1] * DPI))
            assert len(set(image.convert("L").getdata())) > 10  # something was drawn


def test_from_reproduces_the_same_readme(data, tmp_path):
    first = write_report(data, tmp_path / "a").read_text()
    again = write_report(read_report(tmp_path / "a" / "report.json"), tmp_path / "b").read_text()
    assert first == again


def test_zh_and_en_carry_the_same_numbers(data, tmp_path):
    en = write_report(data, tmp_path / "en", "en").read_text()
    zh = write_report(data, tmp_path / "zh", "zh").read_text()
    assert "精度评测" in zh and "性能评测" in zh and "Accuracy" not in zh
    assert decimals(en) == decimals(zh)


def test_cli_report_and_from(monkeypatch, capsys, tiny_dir, tmp_path):
    from vitport.cli import main

    out = tmp_path / "r"
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "vitport",
            "report",
            "--model",
            str(tiny_dir("dinov2")),
            "--device",
            "cpu",
            "--out",
            str(out),
            "--batch-sizes",
            "1",
            "--min-seconds",
            "0.05",
            "--lang",
            "zh",
        ],
    )
    main()
    assert "report written" in capsys.readouterr().out
    assert "# " in (out / "README.md").read_text()
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "vitport",
            "report",
            "--from",
            str(out / "report.json"),
            "--out",
            str(tmp_path / "again"),
            "--lang",
            "zh",
        ],
    )
    main()
    assert (tmp_path / "again" / "README.md").read_text() == (out / "README.md").read_text()
    monkeypatch.setattr(sys, "argv", ["vitport", "report", "--from", str(tmp_path / "nope.json")])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2


def test_the_floor_is_named_for_the_dtype_in_both_languages(data, tmp_path):
    """A bf16 report says its floor is what bf16 costs, in the words compare uses."""
    from vitport.compare.run import CompareResult

    assert data["compare"]["floor_dtype"] == "bf16" and data["compare"]["floor_fp32"]
    en = write_report(data, tmp_path / "en", "en").read_text()
    zh = write_report(data, tmp_path / "zh", "zh").read_text()
    assert CompareResult.from_dict(data["compare"]).floor_kind.split(" (")[0] in en
    assert "rounded to bf16" in en and "fp32 and fp64" not in en
    assert "舍入到 bf16" in zh
    assert "| floor (%) |" in en and "| rel err worst (%) |" in en


@pytest.mark.parametrize("flag", ["--golden", "--reference"])
def test_report_against_a_golden_file(flag, monkeypatch, capsys, tiny_dir, tmp_path):
    """report takes the references compare takes: a golden file from another machine (its own
    images, block states for localisation), by --golden or --reference alike."""
    from test_compare import cli

    model = str(tiny_dir("dinov2"))
    golden = tmp_path / "a.safetensors"
    args = ("infer", "--model", model, "--out", str(golden), "--with-blocks")
    code, _, err = cli(monkeypatch, capsys, *args)
    assert code == 0, err
    out = tmp_path / "report"
    code, _, err = cli(
        monkeypatch,
        capsys,
        "report",
        "--model",
        model,
        "--device",
        "cpu",
        flag,
        str(golden),
        "--out",
        str(out),
        "--batch-sizes",
        "1",
        "--min-seconds",
        "0.05",
    )
    assert code == 0, err
    data = json.loads((out / "report.json").read_text())
    assert data["command"]["reference"] == "golden"
    assert data["compare"]["reference"]["kind"] == "golden" and data["compare"]["passed"]
    assert "golden file's block states" in data["compare"]["localization_reference"]
    assert len(data["compare"]["inputs"]) == 10  # the file's own images
    assert "golden" in (out / "README.md").read_text()


def test_every_language_has_every_word():
    from vitport.report.strings import LANGS, STRINGS

    assert all(set(STRINGS[lang]) == set(STRINGS["en"]) for lang in LANGS)


def test_the_ports_speed_is_stated_beside_the_reference_dtypes(data, tmp_path):
    """bf16 on the CPU against fp32 on the CPU, at the same batch, timed in that run; where
    bf16's measured peak is below fp32's, the line says the device has no bf16 units."""
    import copy

    from vitport.report.render import headline
    from vitport.report.strings import STRINGS

    speed = data["speed"]
    assert speed["dtype"] == "bf16" and speed["reference_dtype"] == "fp32"
    fastest = max(data["bench"]["rows"], key=lambda r: r["images_per_second"])
    assert speed["batch_size"] == fastest["batch_size"]
    assert speed["ratio"] == speed["images_per_second"] / speed["reference_images_per_second"]
    lines = headline(data, STRINGS["en"])
    assert lines[2].startswith(f"**bf16: {speed['ratio']:.2f}x fp32 here** (")
    assert f"at batch {speed['batch_size']}, timed one after the other on cpu)" in lines[2]
    emulated = copy.deepcopy(data)
    emulated["speed"].update(ratio=0.14, emulated=True, peak_tflops=0.0213, fp32_peak_tflops=0.152)
    line = headline(emulated, STRINGS["en"])[2]
    assert line.startswith("**bf16: 0.14x fp32 here**")
    assert line.endswith(
        "; this device has no bf16 units: bf16's measured matmul peak (0.0213 TFLOP/s) is "
        "below fp32's (0.152 TFLOP/s), so it runs emulated."
    )
    zh = headline(emulated, STRINGS["zh"])[2]
    assert "fp32 的 0.14x" in zh and "0.0213 TFLOP/s" in zh and "0.152 TFLOP/s" in zh
    readme = write_report(emulated, tmp_path).read_text()
    assert "- **bf16: 0.14x fp32 here**" in readme
    same = copy.deepcopy(data)
    same["speed"] = None  # a report of fp32 against fp32 (or one from before) has no line
    assert len(headline(same, STRINGS["en"])) == len(lines) - 1
