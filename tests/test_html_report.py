"""The HTML report: drawn from the JSON report, self-contained, one section per kind of data.

What a browser sees is tested in ``test_html_browser.py``; here the page's text: its
sections, tables and plots, that nothing in it points outside the file, the new report
keys it reads, the ``report`` command and ``--html``, and the one-line error without the
``report`` extra.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest

from models import builders
from onnxopt import optimize
from onnxopt.cli import main
from tests import html_pages
from tests.helpers import ROOT
from tests.real_models import real_model

pytest.importorskip("matplotlib", reason="the HTML report needs the 'report' extra (matplotlib)")

from onnxopt.html_report import render_html  # noqa: E402


def _figures(page: str) -> dict[str, str]:
    """Figure id -> its markup."""
    return dict(re.findall(r'<figure id="([^"]+)" class="plot">(.*?)</figure>', page, flags=re.S))


def _rows(page: str, table: str) -> list[str]:
    body = re.search(rf'<table class="{table}">.*?<tbody>(.*?)</tbody>', page, flags=re.S).group(1)
    return re.findall(r"<tr[^>]*>.*?</tr>", body, flags=re.S)


def _assert_self_contained(page: str) -> None:
    assert "Content-Security-Policy" in page and "default-src 'none'" in page
    assert "<script" not in page and "<link" not in page and "@import" not in page
    assert not re.search(r'(src|href)="(?!#)', page), "a reference that leaves the page"
    assert not re.search(r"url\((?!#)", page), "a CSS url() that leaves the page"
    ids = re.findall(r'\sid="([^"]+)"', page)
    assert len(ids) == len(set(ids)), "duplicate element ids"


def _assert_plots(page: str, expected: set[str]) -> dict[str, str]:
    figures = _figures(page)
    assert expected <= set(figures), f"missing plots: {expected - set(figures)}"
    for slug, markup in figures.items():
        assert f'<title id="{slug}-title">' in markup and f'<desc id="{slug}-desc">' in markup
        desc = re.search(r"<desc[^>]*>(.*?)</desc>", markup, flags=re.S).group(1)
        assert len(desc) > 30, f"{slug}: no text alternative"
        assert re.search(rf'id="{slug}-data-', markup), f"{slug}: no data marks"
        assert "<figcaption>" in markup
    return figures


def test_exact_page_has_model_passes_fidelity_and_latency():
    data = html_pages.report("exact")
    page = render_html(data)
    _assert_self_contained(page)
    _assert_plots(page, {"ops", "gains", "fidelity0", "latency"})
    assert "validation passed" in page and "validation failed" not in page
    assert len(_rows(page, "passes")) == len(data["passes"])
    assert len(_rows(page, "fidelity")) == len(data["validation"][0]["outputs"])
    assert "Per layer" not in page and 'id="search"' not in page and 'id="finetune"' not in page
    # nodes by op type come from the report's new keys
    assert data["input"]["ops"]["BatchNormalization"] > 0 and "BatchNormalization" not in data["output"]["ops"]
    assert data["input"]["opsets"] == {"": 17} and data["output"]["ir_version"] == data["input"]["ir_version"]


def test_lossy_page_draws_the_per_layer_figures():
    data = html_pages.report("lossy")
    names = [p["name"] for p in data["passes"]]
    assert names == ["prune-channels", "reconstruct", "quantize"]
    page = render_html(data)
    _assert_self_contained(page)
    figures = _assert_plots(page, {"pass0-sensitivity", "pass2-guard", "layers-channels", "layers-bits"})
    # the layers the guard kept float are named in the bits chart and in the report's layers
    kept = {f["name"] for f in data["passes"][2]["stats"]["guard"]["float_layers"]}
    assert kept and kept == {r["name"] for r in data["layers"] if r["float_by_guard"]}
    assert all(r["bits"] == 32 for r in data["layers"] if r["float_by_guard"])
    assert any(r["bits"] == 8 for r in data["layers"])
    assert f"kept float by the accuracy guard ({len(kept)})" in figures["layers-bits"]
    pruned = [r for r in data["layers"] if r["channels"] < r["channels_before"]]
    assert pruned, "prune-channels removed no channel"


def test_prune_magnitude_layers_are_drawn_in_graph_order():
    _, report = optimize(builders.cnn(), "prune-magnitude(sparsity=0.5,min_size=100),share-weights(bits=4,min_size=100)",
                         runs=0, min_cosine=0.0)
    data = report.as_dict()
    page = render_html(data)
    figures = _assert_plots(page, {"pass0-layers", "pass1-layers"})
    assert "sparsity" in figures["pass0-layers"] and "bits" in figures["pass1-layers"]
    rows = data["passes"][0]["stats"]["layers"]
    ticks = re.findall(r"<text[^>]*>([^<]+)</text>", figures["pass0-layers"])
    positions = [ticks.index(r["layer"]) for r in rows]
    assert positions == sorted(positions)


def test_search_and_finetune_sections_from_their_report_keys():
    data = html_pages.report("search")
    page = render_html(data)
    _assert_self_contained(page)
    figures = _assert_plots(page, {"pareto", f"history{len(data['passes']) - 1}"})
    trials = data["search"]["trials"]
    rows = _rows(page, "trials")
    assert len(rows) == len(trials)
    chosen = [r for r in rows if 'class="chosen"' in r]
    assert len(chosen) == 1 and "prune-magnitude(sparsity=0.5),share-weights(bits=5)" in chosen[0].replace("<wbr>", "")
    for t in trials:  # every trial's pipeline string is on the page, verbatim (<wbr>: a place to wrap)
        assert f"<code>{t['pipeline']}</code>" in page.replace("<wbr>", "")
    pareto = figures["pareto"]
    for tag in ("ok", "bad", "front", "preset", "chosen"):
        assert f'id="pareto-data-{tag}-0"' in pareto, tag
    assert "int8" in pareto and "chosen: t02" in pareto
    assert "hold-out fidelity" in page


def test_search_cut_short_and_nothing_chosen():
    data = html_pages.report("search")
    data["search"].update(cut=True, chosen=None)
    for t in data["search"]["trials"]:
        t["chosen"] = False
    page = render_html(data)
    assert "time budget ran out" in page and "nothing was chosen" in page
    assert 'class="chosen"' not in page


def test_failed_validation_lists_the_failed_outputs_first_in_red():
    data = html_pages.report("failed")
    page = render_html(data)
    _assert_self_contained(page)
    assert "validation failed" in page and 'role="alert"' in page
    banner = re.search(r'<div class="banner" role="alert">(.*?)</div>', page, flags=re.S).group(1)
    failed = [o["name"] for o in data["validation"][0]["outputs"] if not o["passed"]]
    assert failed and all(name in banner for name in failed)
    first = _rows(page, "fidelity")[0]
    assert 'class="fail"' in first and failed[0] in first
    assert page.index('role="alert"') < page.index('id="model"')
    assert "#dc2626" in _figures(page)["fidelity0"]  # the failed bar is red


def test_failed_output_sorts_before_passing_ones():
    data = html_pages.report("exact")
    outputs = data["validation"][0]["outputs"]
    good = dict(outputs[0], name="good")
    bad = dict(outputs[0], name="bad", passed=False, cosine=0.2, reason="cosine 0.2 < 0.99")
    data["validation"][0]["outputs"] = [good, bad]
    data["validation"][0]["passed"] = False
    rows = _rows(render_html(data), "fidelity")
    assert "bad" in rows[0] and 'class="fail"' in rows[0] and 'class="fail"' not in rows[1]


def test_not_validated_report_renders():
    _, report = optimize(builders.mlp(), "dead-nodes", validate_output=False)
    page = report.to_html()
    assert "not validated" in page and "--no-validate" in page


def test_page_is_deterministic():
    data = html_pages.report("lossy")
    assert render_html(data) == render_html(data)


def test_optimize_html_and_report_command(tmp_path, capsys):
    src = tmp_path / "m.onnx"
    src.write_bytes(builders.cnn().SerializeToString())
    out, js, page = tmp_path / "o.onnx", tmp_path / "r.json", tmp_path / "r.html"
    assert main(["optimize", str(src), "-o", str(out), "--report", str(js), "--html", str(page), "-q",
                 "--shape", "input=2x3x32x32", "--runs", "2"]) == 0
    text = page.read_text()
    assert "validation passed" in text and str(out) in text
    again = tmp_path / "again.html"
    assert main(["report", str(js), "-o", str(again), "-q"]) == 0
    assert again.read_text() == text  # the page is drawn from the JSON alone


def test_optimize_html_is_written_when_validation_fails(tmp_path):
    src = tmp_path / "m.onnx"
    src.write_bytes(builders.cnn().SerializeToString())
    page = tmp_path / "r.html"
    code = main(["optimize", str(src), "-o", str(tmp_path / "o.onnx"), "-p", html_pages.FAILING,
                 "--min-cosine", "0.999", "--html", str(page), "-q", "--runs", "0"])
    assert code == 1 and not (tmp_path / "o.onnx").exists()
    assert 'role="alert"' in page.read_text()


@pytest.mark.parametrize("content, message", [
    ("{not json", "not a JSON report"),
    ('{"schema": 2, "passes": []}', "not an onnxopt JSON report of schema 1"),
])
def test_report_command_rejects_what_is_not_a_report(tmp_path, capsys, content, message):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    assert main(["report", str(bad), "-o", str(tmp_path / "x.html")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("onnxopt: error:") and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x.html").exists()


def test_report_command_missing_file_and_bad_output_folder(tmp_path, capsys):
    assert main(["report", str(tmp_path / "none.json"), "-o", str(tmp_path / "x.html")]) == 2
    assert "no such file" in capsys.readouterr().err
    js = tmp_path / "r.json"
    js.write_text(json.dumps(html_pages.report("exact")))
    assert main(["report", str(js), "-o", str(tmp_path / "missing" / "x.html")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_without_matplotlib_html_is_one_line_naming_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    src = tmp_path / "m.onnx"
    src.write_bytes(builders.mlp().SerializeToString())
    started = time.perf_counter()
    code = main(["optimize", str(src), "-o", str(tmp_path / "o.onnx"), "--html", str(tmp_path / "r.html")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.splitlines() == [err]
    assert "onnxopt[report]" in err and "matplotlib" in err
    assert not (tmp_path / "o.onnx").exists(), "the run should stop before optimizing"
    assert time.perf_counter() - started < 5
    js = tmp_path / "r.json"
    js.write_text(json.dumps(html_pages.report("exact")))
    assert main(["report", str(js), "-o", str(tmp_path / "r.html")]) == 2
    assert "onnxopt[report]" in capsys.readouterr().err
    with pytest.raises(Exception, match=r"onnxopt\[report\]"):
        render_html(html_pages.report("exact"))


def test_core_does_not_import_matplotlib():
    code = ("import sys, onnxopt, onnxopt.cli, onnxopt.report, onnxopt.api\n"
            "from models import builders\n"
            "onnxopt.optimize(builders.mlp(), 'default', runs=0)\n"
            "assert 'matplotlib' not in sys.modules, 'matplotlib imported by the core'\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_ppocr_det_pages_stay_small(tmp_path):
    path = real_model("ppocr-det")
    _, report = optimize(path, "default", runs=2)
    page = report.to_html()
    assert len(page.encode()) < 2 * 2**20
    assert len(_figures(page)) >= 4


def test_report_without_the_added_keys_still_renders():
    """A JSON report written before ops/opsets/layers/search existed draws what it has."""
    data = html_pages.report("lossy")
    for block in (data["input"], data["output"]):
        for key in ("ops", "opsets", "ir_version"):
            del block[key]
    del data["layers"], data["search"]
    page = render_html(data)
    figures = _assert_plots(page, {"gains", "fidelity0", "latency", "pass0-sensitivity", "pass2-guard"})
    assert "ops" not in figures and "layers-bits" not in figures


def test_validate_command_report_renders(tmp_path):
    src, js = tmp_path / "m.onnx", tmp_path / "v.json"
    src.write_bytes(builders.mlp().SerializeToString())
    assert main(["validate", str(src), str(src), "--report", str(js), "-q", "--runs", "0"]) == 0
    page = tmp_path / "v.html"
    assert main(["report", str(js), "-o", str(page), "-q"]) == 0
    text = page.read_text()
    assert "validation passed" in text and 'id="passes"' not in text


def test_preload_imports_the_plotting_library_in_the_background():
    from onnxopt.plots import preload

    thread = preload()
    thread.join(timeout=60)
    assert not thread.is_alive() and thread.daemon
    assert "matplotlib.figure" in sys.modules and "matplotlib.backends.backend_svg" in sys.modules


def test_a_real_finetune_run_draws_its_loss_and_holdout_curves():
    pytest.importorskip("torch")
    import numpy as np

    rng = np.random.default_rng(0)
    calib = [{"input": rng.standard_normal((4, 64)).astype(np.float32)} for _ in range(20)]
    pipeline = "prune-magnitude(sparsity=0.8),finetune(steps=20,eval_every=5,threads=1)"
    _, report = optimize(builders.mlp(), pipeline, calibration=calib, min_cosine=0.5, runs=0)
    data = report.as_dict()
    history = data["passes"][-1]["stats"]["history"]
    assert len(history["loss"]) == len(history["step"]) > 0 and history["holdout"]
    page = render_html(data)
    _assert_self_contained(page)
    figures = _assert_plots(page, {f"history{len(data['passes']) - 1}"})
    assert "holdout" in figures[f"history{len(data['passes']) - 1}"]
