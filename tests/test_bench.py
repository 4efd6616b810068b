"""The benchmark harness: statistics, reports, and a smoke run of `trifuse bench kernels`."""

import csv
import json
import os

import numpy as np
import pytest
import torch

from tests.helpers import bench_row_passed
from trifuse.bench import report
from trifuse.bench.suite import Options, check_and_time, matches
from trifuse.bench.timing import Timing, copy_bandwidth, measure
from trifuse.cli import main as trifuse_main


def test_timing_statistics():
    t = Timing(np.array([1.0, 2.0, 3.0, 4.0, 100.0]), cold_ms=50.0)
    s = t.summary()
    assert s["median_ms"] == 3.0  # robust to the outlier the mean is not
    assert s["mean_ms"] == 22.0
    assert s["p10_ms"] == pytest.approx(1.4)
    assert s["std_ms"] == pytest.approx(np.std([1, 2, 3, 4, 100], ddof=1))
    assert s["cv"] == pytest.approx(s["std_ms"] / 22.0)
    assert s["iters"] == 5 and s["cold_ms"] == 50.0


def test_measure_cpu_counts_and_orders():
    calls, threads = [], []
    before = torch.get_num_threads()
    t = measure(lambda: calls.append(1) or threads.append(torch.get_num_threads()), "cpu", warmup=3,
                min_time_s=0.0, min_iters=12, threads=1)
    assert len(t.samples_ms) == 12
    assert len(calls) == 1 + 3 + 12  # cold call, warm-up, samples
    assert (t.samples_ms >= 0).all() and t.cold_ms is not None
    assert set(threads) == {1} and torch.get_num_threads() == before  # pinned while timing, restored after
    s = t.summary()
    assert s["threads"] == 1 and s["load_before"] >= 0 and s["load_after"] >= 0


def test_measure_bounds_a_slow_call_by_max_time(monkeypatch):
    """A call that takes 12 s (a fake clock: no real time passes) gets one warm-up call and the minimum
    samples, not ``warmup + min_iters`` calls; a fast call keeps its counts (the test above)."""
    from trifuse.bench import timing

    clock = [0.0]
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(timing.time, "perf_counter_ns", lambda: int(clock[0] * 1e9))
    calls = []

    def slow():
        calls.append(1)
        clock[0] += 12.0

    t = measure(slow, "cpu", warmup=10, min_time_s=0.25, min_iters=6, threads=1, max_time_s=30.0)
    assert len(calls) == 1 + 1 + timing.MIN_SLOW_SAMPLES  # cold, one warm-up, the fewest samples
    assert list(t.samples_ms) == [12000.0] * timing.MIN_SLOW_SAMPLES and t.cold_ms == 12000.0
    calls.clear()
    t = measure(slow, "cpu", warmup=2, min_time_s=0.25, min_iters=6, threads=1, max_time_s=200.0)
    assert len(calls) == 1 + 2 + 6  # within the bound: as asked


def test_timing_flags_noise():
    """Each reason alone makes a measurement noisy, and the status says which."""
    steady = np.full(30, 2.0) + np.linspace(0, 0.02, 30)
    assert Timing(steady).noise() is None and Timing(steady).status() == "ok"
    spread = np.tile([1.0, 1.0, 1.0, 4.0], 8)  # p10..p90 band wider than the median
    assert "spread" in Timing(spread).status()
    drift = np.concatenate([np.full(10, 1.0), np.full(10, 1.0), np.full(10, 2.0)])  # the last run is slower
    t = Timing(drift)
    assert t.status().startswith("noisy") and "repeats disagree" in t.noise()
    loaded = Timing(steady, load=(0.5, 5.0), cpus=2)
    assert loaded.noise() == "load average 0.5 -> 5.0 on 2 CPUs"
    assert Timing(steady, load=(1.5, 1.9), cpus=2).noise() is None


def test_speedups_never_from_noisy_rows():
    from trifuse.bench.suite import add_speedups

    def row(backend, ms, status="ok"):
        return {"backend": backend, "median_ms": ms, "status": status}

    rows = add_speedups([row("hf-eager", 10.0), row("reference", 5.0), row("hf-sdpa", 1.0, "noisy: spread")])
    assert rows[1]["speedup_vs_hf_eager"] == 2.0 and "speedup_vs_hf_eager" not in rows[2]
    rows = add_speedups([row("hf-eager", 10.0, "noisy: load"), row("reference", 5.0)])
    assert all("speedup_vs_hf_eager" not in r for r in rows)  # no ratio against a noisy baseline


def test_copy_bandwidth_counts_bytes_read_and_written(monkeypatch):
    """GB/s = (bytes read + bytes written) / the median copy time, and the timed call copies the whole
    source buffer (its uniform [0, 1) values). The clock is stubbed: no load can change the answer."""
    from trifuse.bench import timing

    copied = []

    def fake_measure(fn, device, **kw):
        dst = fn()
        copied.append((dst.numel() * dst.element_size(), float(dst.min()), float(dst.max()), float(dst.std())))
        return Timing(np.array([0.25, 0.5, 4.0]))  # median 0.5 ms

    monkeypatch.setattr(timing, "measure", fake_measure)
    assert copy_bandwidth("cpu", nbytes=1 << 20) == pytest.approx(2 * (1 << 20) / 0.5e-3 / 1e9)
    ((nbytes, lo, hi, std),) = copied
    assert nbytes == 1 << 20 and 0 <= lo and hi < 1 and std == pytest.approx(12 ** -0.5, rel=0.05)


def test_check_and_time_refuses_to_time_a_wrong_answer():
    opts = Options(device=torch.device("cpu"), dtype=torch.float32, quick=True)
    ref = torch.ones(8, dtype=torch.float64)
    assert check_and_time(lambda: torch.ones(8) * 1.01, ref, opts) == {
        "status": "mismatch", "max_abs_err": pytest.approx(0.01)}
    ok = check_and_time(lambda: torch.ones(8), ref, opts)
    assert bench_row_passed(ok) and ok["median_ms"] >= 0 and ok["threads"] >= 1
    err = check_and_time(lambda: 1 / 0, ref, opts)
    assert err["status"].startswith("error: ZeroDivisionError")
    assert matches((torch.ones(2), torch.zeros(2)), (torch.ones(2), torch.zeros(2)), torch.float32)


def test_write_results(tmp_path):
    rows = [{"suite": "kernels", "op": "layer_norm", "shape": "2x8", "numel": 16, "dtype": "fp32",
             "backend": "eager", "status": "ok", "median_ms": 0.5, "gbps": 1.0}]
    env = {"device": "test-cpu", "torch": torch.__version__, "git_commit": "abc"}
    paths = report.write_results(rows, env, {"copy_gbps": 2.0}, tmp_path, "k", "title", ["a note"])
    names = {p.name for p in paths}
    assert {"k.json", "k.csv", "k.md"} <= names
    data = json.loads((tmp_path / "k.json").read_text())
    assert data["rows"] == rows and data["environment"] == env
    with (tmp_path / "k.csv").open() as f:
        (row,) = list(csv.DictReader(f))
    assert row["device"] == "test-cpu" and row["backend"] == "eager" and float(row["median_ms"]) == 0.5
    md = (tmp_path / "k.md").read_text()
    assert "copy_gbps: 2.0" in md and "a note" in md and "| layer_norm |" in md


def test_cli_bench_kernels_smoke(tmp_path, capsys):
    rc = trifuse_main(["bench", "kernels", "--quick", "--rows", "16", "--widths", "96",
                       "--backends", "trifuse", "reference", "eager", "--out", str(tmp_path)])
    assert rc == 0
    (result,) = list(tmp_path.glob("kernels-*.json"))
    rows = json.loads(result.read_text())["rows"]
    assert {r["op"] for r in rows} == {"layer_norm", "add_layer_norm", "add_rms_norm",
                                       "bias_gelu", "bias_gelu_tanh", "gated_gelu"}
    assert all(bench_row_passed(r) for r in rows), rows
    assert all(r["max_abs_err"] < 1e-4 for r in rows)
    timed = [r for r in rows if r["status"] == "ok"]
    assert all(r["gbps"] > 0 and 0 < r["frac_of_peak"] for r in timed)
    assert "layer_norm" in capsys.readouterr().out


def test_cli_rejects_unknown_suite(capsys):
    with pytest.raises(SystemExit) as e:
        trifuse_main(["bench", "nope", "--quick"])
    assert e.value.code == 2 and "unknown suite(s) ['nope']" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--batch", "0"], "argument --batch: must be > 0, got 0"),
    (["--seq", "16", "-3"], "argument --seq: must be > 0, got -3"),
    (["--rows", "two"], "argument --rows: 'two' is not a whole number"),
    (["--warmup", "-1"], "argument --warmup: must be >= 0, got -1"),
    (["--min-time", "0"], "argument --min-time: must be > 0, got 0"),
    (["--min-time", "nan"], "argument --min-time: must be > 0, got nan"),
    (["--threads", "0"], "argument --threads: must be > 0, got 0"),
    (["--quick", "--full"], "argument --full: not allowed with argument --quick"),
    (["kernels", "--keep-onnx"], "--keep-onnx applies to the main job"),
])
def test_cli_refuses_bad_arguments_in_one_line(args, message, capsys):
    """Out-of-range sizes are refused (exit status 2, one error line), never clamped."""
    with pytest.raises(SystemExit) as e:
        trifuse_main(["bench", *args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err, err
    assert len([line for line in err.splitlines() if "error:" in line]) == 1


def test_tables_fit_80_columns_without_cutting_names(monkeypatch):
    from rich.console import Console

    console = Console(width=80, record=True, file=open(os.devnull, "w"), highlight=False)
    monkeypatch.setattr(report, "console", console)
    rows = [{"suite": "models", "op": "distilbert-small prefill", "shape": "1x64", "dtype": "fp32",
             "backend": "torch-compile-max-autotune", "median_ms": 12.3456, "p10_ms": 12.0, "p90_ms": 13.0,
             "spread": 0.08, "cv": 0.03, "tokens_per_s": 5184.0, "speedup_vs_hf_eager": 1.04, "rel_err": 1e-6,
             "max_abs_err": 1e-6, "cold_ms": 80.0, "threads": 1,
             "status": "noisy: p10-p90 spread 80% of the median; load average 2.5 -> 3.1 on 2 CPUs"}]
    report.print_table(rows, "a title")
    lines = console.export_text().splitlines()
    assert max(map(len, lines)) <= 80 and "…" not in "".join(lines)
    header = next(i for i, line in enumerate(lines) if line.lstrip().startswith("op "))
    starts = [lines[header].index(h) for h in ("op", "shape", "backend", "status", "median")]
    body = [line for line in lines[header + 2:] if line.strip()]
    cells = ["".join(line[a:b] for line in body).replace(" ", "") for a, b in zip(starts, starts[1:])]
    # every name whole, wrapped over lines, never cut
    assert cells == ["distilbert-smallprefill", "1x64", "torch-compile-max-autotune", "noisy:spread,load"], body
    assert "12.35 ±4%" in body[0]
    # a backend name of up to 16 characters stays on one line (folding cut "trifuse-native" mid-word)
    console.export_text(clear=True)
    decode = {"suite": "decoder", "op": "gpt2-tiny prefill", "shape": "1x32", "dtype": "fp32", "status": "ok",
              "median_ms": 1.76, "spread": 0.06, "tokens_per_s": 18180.0, "speedup_vs_hf_eager": 0.83}
    report.print_table([{**decode, "backend": "trifuse-native"}, {**decode, "backend": "hf-eager"}], "two")
    assert any("trifuse-native" in line for line in console.export_text().splitlines())
    report.print_table(rows, "wide", wide=True)
    assert "rel err" in console.export_text()


def test_matplotlib_missing_is_said_once(tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    monkeypatch.setattr(report, "_warned", [])
    rows = [{"op": "layer_norm", "shape": "2x8", "numel": 16, "backend": "eager", "status": "ok",
             "median_ms": 0.5, "gbps": 1.0}]
    for stem in ("a", "b"):
        paths = report.write_results(rows, {"device": "cpu"}, {}, tmp_path, stem, "t")
        assert not [p for p in paths if p.suffix == ".png"]
    out = capsys.readouterr().out
    assert out.count("matplotlib is not installed") == 1 and "pip install 'trifuse[bench]'" in out
    assert "matplotlib is not installed" in (tmp_path / "a.md").read_text()


def test_plots_show_trifuse_and_fall_back_to_bars(tmp_path):
    """One point per backend: bars, with trifuse's CPU path named as such; several batches: lines."""
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    drawn = []
    real = plt.Figure.savefig

    def spy(fig, path, **kw):
        drawn.append((path, [ax for ax in fig.axes if ax.get_visible()]))
        return real(fig, path, **kw)

    rows = [{"op": "bert-small", "shape": f"{b}x32", "batch": b, "seq": 32, "backend": be, "status": st,
             "median_ms": ms * b, "p10_ms": 0.9 * ms * b, "p90_ms": 1.1 * ms * b}
            for b in (1,) for be, ms, st in (("reference", 9.0, "ok"), ("hf-eager", 9.5, "ok"),
                                              ("hf-sdpa", 8.0, "noisy: load"))]
    with pytest.MonkeyPatch.context() as m:
        m.setattr(plt.Figure, "savefig", spy)
        assert report.plot_latency(rows, tmp_path / "bars.png", "t", "cpu")
        (_, (ax,)), = drawn
        assert len(ax.patches) == 3 and ax.get_legend() is None and ax.get_yscale() == "linear"
        labels = [t.get_text() for t in ax.get_xticklabels()]
        assert labels[0] == "trifuse on CPU\n(reference ops)", labels
        drawn.clear()
        more = rows + [{**r, "batch": 8, "shape": "8x32", "median_ms": 8 * r["median_ms"]} for r in rows]
        assert report.plot_latency(more, tmp_path / "lines.png", "t", "cpu")
        (_, (ax,)), = drawn
        assert ax.get_yscale() == "log" and not ax.patches
        legend = [t.get_text() for t in ax.get_legend().get_texts()]
        assert legend[0] == "trifuse on CPU (reference ops)", legend
    assert (tmp_path / "bars.png").stat().st_size > 0


def test_cli_bench_model_checkpoint_dir(tmp_path, capsys):
    """A local checkpoint directory as the model; every backend checked against HF eager first."""
    from tests.test_bert import hf_model

    ckpt = tmp_path / "ckpt"
    hf_model("roberta", "Model").save_pretrained(ckpt)
    rc = trifuse_main(["bench", str(ckpt), "--quick", "--batch", "2", "--seq", "16",
                       "--backends", "trifuse", "reference", "hf-eager", "hf-sdpa", "onnxruntime-cpu",
                       "--out", str(tmp_path)])
    assert rc == 0
    (result,) = list(tmp_path.glob("models-*.json"))
    rows = {r["backend"]: r for r in json.loads(result.read_text())["rows"]}
    assert bench_row_passed(rows["trifuse"])  # interpreted Triton is checked, not timed
    for b in ("reference", "hf-eager", "hf-sdpa", "onnxruntime-cpu"):
        assert bench_row_passed(rows[b]) and rows[b]["status"] != "checked" and rows[b]["rel_err"] < 1e-4
        assert rows[b]["status"] != "ok" or rows[b]["tokens_per_s"] > 0
    assert rows["hf-eager"]["status"] != "ok" or rows["hf-eager"]["speedup_vs_hf_eager"] == 1.0
    assert (tmp_path / result.name.replace(".json", ".png")).exists()


def test_cli_bench_routes_vit_checkpoint_to_vit_suite(tmp_path):
    from tests.test_vit import CONFIGS, hf_model

    ckpt = tmp_path / "vit"
    hf_model(next(iter(CONFIGS)), "ForImageClassification").save_pretrained(ckpt)
    rc = trifuse_main(["bench", str(ckpt), "--quick", "--batch", "2",
                       "--backends", "trifuse", "reference", "hf-eager", "--out", str(tmp_path)])
    assert rc == 0
    (result,) = list(tmp_path.glob("vision-*.json"))
    rows = {r["backend"]: r for r in json.loads(result.read_text())["rows"]}
    assert bench_row_passed(rows["trifuse"])
    assert all(bench_row_passed(rows[b]) and rows[b]["status"] != "checked" for b in ("reference", "hf-eager"))


def test_cli_bench_vit_quantize_int8_runs_the_int8_model(tmp_path, monkeypatch):
    """`--quantize int8` reaches the vision suite's trifuse rows (it ran them in fp32 before, silently)."""
    from tests.test_vit import CONFIGS, hf_model
    from trifuse.engine import quantize

    calls = []
    forward = quantize.Int8Linear.forward
    monkeypatch.setattr(quantize.Int8Linear, "forward",
                        lambda self, x, **kw: calls.append(1) or forward(self, x, **kw))
    ckpt = tmp_path / "vit"
    hf_model(next(iter(CONFIGS)), "ForImageClassification").save_pretrained(ckpt)
    rc = trifuse_main(["bench", str(ckpt), "--quick", "--batch", "1", "--device", "cpu", "--quantize", "int8",
                       "--backends", "trifuse-native", "hf-eager", "--out", str(tmp_path)])
    assert rc == 0 and calls
    (result,) = list(tmp_path.glob("vision-*.json"))
    rows = {r["backend"]: r for r in json.loads(result.read_text())["rows"]}
    assert bench_row_passed(rows["trifuse-native"]) and rows["trifuse-native"]["rel_err"] > 0


@pytest.mark.parametrize("model,suite,first", [("gpt2-tiny", "decoder", "prefill"), ("t5-tiny", "seq2seq", "encoder")])
def test_cli_bench_generative_quantize_int8_runs_the_int8_model(model, suite, first, tmp_path, monkeypatch):
    """`--quantize int8` reaches the decoder and seq2seq suites: trifuse-native's rows (the prompt's pass
    and decoding) run the int8 model, pass within the int8 budget, and the report says which rows are int8."""
    from trifuse.engine import quantize

    calls = []
    forward = quantize.Int8Linear.forward
    monkeypatch.setattr(quantize.Int8Linear, "forward",
                        lambda self, x, **kw: calls.append(1) or forward(self, x, **kw))
    rc = trifuse_main(["bench", model, "--quick", "--device", "cpu", "--quantize", "int8",
                       "--backends", "trifuse-native", "hf-eager", "--out", str(tmp_path)])
    assert rc == 0 and calls
    (result,) = list(tmp_path.glob(f"{suite}-*.json"))
    data = json.loads(result.read_text())
    ours = [r for r in data["rows"] if r["backend"] == "trifuse-native"]
    assert {r["phase"] for r in ours} == {first, "decode"}
    assert all(bench_row_passed(r) for r in ours), ours
    assert any("--quantize int8: the trifuse rows" in n for n in data["notes"])


def test_cli_bench_gpt2_smoke(tmp_path):
    rc = trifuse_main(["bench", "gpt2-tiny", "--quick", "--backends", "trifuse", "reference", "hf-eager",
                       "--out", str(tmp_path)])
    assert rc == 0
    (result,) = list(tmp_path.glob("decoder-*.json"))
    rows = json.loads(result.read_text())["rows"]
    assert rows and all(bench_row_passed(r) for r in rows), rows


def _result(path, rows, device="dev"):
    path.write_text(json.dumps({"environment": {"device": device, "torch": "x", "git_commit": "c"}, "rows": rows}))
    return path


def _row(op, median, p10, p90, backend="trifuse"):
    return {"suite": "kernels", "op": op, "shape": "8x8", "dtype": "fp16", "backend": backend,
            "median_ms": median, "p10_ms": p10, "p90_ms": p90}


def test_compare_flags_only_changes_beyond_noise(tmp_path, capsys):
    from trifuse.bench.compare import compare

    old = [_row("a", 1.0, 0.98, 1.02), _row("b", 1.0, 0.98, 1.02), _row("c", 1.0, 0.9, 1.1),
           _row("d", 1.0, 0.98, 1.02), _row("gone", 1.0, 0.9, 1.1), {**_row("e", 1.0, 1, 1), "median_ms": None}]
    new = [_row("a", 1.20, 1.18, 1.22),  # slower, bands apart: regression
           _row("b", 0.80, 0.79, 0.81),  # faster, bands apart: improvement
           _row("c", 1.05, 0.95, 1.15),  # bands overlap: noise
           _row("d", 1.01, 1.005, 1.015),  # bands apart but under the 2% threshold
           _row("new", 1.0, 0.9, 1.1)]
    verdicts = {e["op"]: e["verdict"] for e in compare(old, new)}
    assert verdicts == {"a": "regression", "b": "improvement", "c": "within noise", "d": "within noise"}

    a, b = _result(tmp_path / "a.json", old), _result(tmp_path / "b.json", new)
    assert trifuse_main(["compare", str(a), str(b)]) == 1
    out = capsys.readouterr().out
    assert "+20.0%" in out and "1 regression, 1 improvement, 2 within noise" in out
    from trifuse.bench.cli import main as bench_main

    assert bench_main(["compare", str(a), str(a)]) == 0
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(SystemExit, match="not a trifuse bench result"):
        trifuse_main(["compare", str(a), str(bad)])


def test_compare_never_judges_a_noisy_row():
    from trifuse.bench.compare import compare

    old = [_row("a", 1.0, 0.98, 1.02), _row("b", 1.0, 0.98, 1.02)]
    new = [{**_row("a", 2.0, 1.9, 2.1), "status": "noisy: load average 5.0 -> 5.2 on 2 CPUs"},
           _row("b", 2.0, 1.9, 2.1)]
    assert {e["op"]: e["verdict"] for e in compare(old, new)} == {"a": "noisy", "b": "regression"}


def test_headline_on_a_gpu_names_the_figures_that_matter():
    """The headline from a GPU run's rows (no GPU needed): failures named, then the figures."""
    from trifuse.bench.default import headline
    from trifuse.bench.suite import SuiteResult

    def ok(**row):
        return {"status": "ok", **row}

    results = {
        "kernels": SuiteResult("k", [
            ok(op="layer_norm", shape="16384x4096", backend="trifuse", median_ms=0.1, frac_of_peak=0.88),
            ok(op="bias_gelu", shape="2048x768", backend="trifuse", median_ms=0.1, frac_of_peak=0.61),
            {"op": "layer_norm", "shape": "2048x768", "backend": "eager", "status": "mismatch"}]),
        "models": SuiteResult("m", [
            ok(op="bert-base", shape="1x128", backend="trifuse", median_ms=0.4, speedup_vs_hf_eager=3.0),
            ok(op="bert-base", shape="8x128", backend="trifuse", median_ms=1.4, speedup_vs_hf_eager=2.0),
            {"op": "bert-base", "shape": "8x128", "backend": "hf-sdpa", "status": "noisy: spread", "median_ms": 1.0}]),
        "gpt2": SuiteResult("g", [ok(op="gpt2 decode", phase="decode", shape="1x128", backend="trifuse",
                                     median_ms=0.35, batch=1, seq=128)]),
    }
    opts = Options(device=torch.device("cuda"), dtype=torch.float16)
    lines = headline(results, {"device": "NVIDIA H200"}, opts, "finished", 300, 320)
    assert lines[0].startswith("**Finished** after 5:00 of wall time and 5:20 of CPU time") and "full run" in lines[0]
    assert lines[1].startswith("**1 of 7 checks FAILED**, peers' only (trifuse's passed): eager layer_norm")
    assert "6 measurements, **1 flagged noisy**" in lines[2]
    assert "Models, trifuse against Hugging Face eager: 2.45x, geometric mean of 2" in lines[3]
    assert lines[4] == "Norm/GELU kernels: 61% to 88% of the measured ceiling (best: layer_norm 16384x4096)."
    assert lines[5] == "Decode: gpt2 0.350 ms/token at batch 1, context 128."
    assert not any("needs a GPU" in line for line in lines)

    cpu = Options(device=torch.device("cpu"), dtype=torch.float32, quick=True, threads=2)
    results = {"models": SuiteResult("m", [
        ok(op="bert-small", shape="1x32", backend="reference", median_ms=9.0, speedup_vs_hf_eager=1.1),
        {"op": "bert-small", "shape": "1x32", "backend": "trifuse", "status": "checked"}])}
    lines = headline(results, {"device": "AMD EPYC"}, cpu, "finished", 200, 190)
    assert "a quick run on AMD EPYC" in lines[0] and "CPU timings on 2 intra-op threads" in lines[0]
    assert lines[1] == "**All 2 checks passed** (models 2/2)."
    assert "**Timing of the Triton kernels needs a GPU; see scripts/device-check.sh.**" in lines[3]
    assert lines[4].startswith("On this CPU, trifuse's own path (its reference ops) against Hugging Face eager: 1.10x")


def test_main_job_plan_covers_every_family_with_declared_sizes(monkeypatch):
    """The main job's model rows (bench/default.py's PLAN) name sizes their family declares, every
    registered family runs, and a family without a row still runs at its first named size."""
    from trifuse.bench import default
    from trifuse.engine import registry
    from trifuse.engine.family import Family

    rows = default._rows()
    assert {fam.name for _, fam in rows} == {f.name for f in registry.families()}
    for row, fam in rows:
        assert {row.small, row.base, row.quick} <= set(fam.named_sizes), row
        assert row.seconds > 0
    plan = default._plan()
    assert [label for label, _, _ in plan] == [row.label for row, _ in rows]
    assert all(module == default.SUITE_OF_KIND[fam.kind] for (_, module, _), (_, fam) in zip(plan, rows))
    assert set(default._quick_cpu_sizes()) < {row.label for row, _ in rows}

    # A new family with no row: planned at its first sizes, the default weight; a row with an unknown size: refused.
    base = registry.families()[0]
    new = Family(name="newfam", kind=base.kind, model_types=("newfam",), model_classes=(), from_checkpoint=None,
                 hf_classes={}, config_defaults={"newfam": {}}, example_inputs=None,
                 named_sizes={"newfam-a": {"model_type": "newfam"}, "newfam-b": {"model_type": "newfam"}})
    registered = registry.families()
    monkeypatch.setattr(registry, "families", lambda: (*registered, new))
    label, module, sizes = default._plan()[-1]
    assert (label, module, sizes) == ("newfam", default.SUITE_OF_KIND[base.kind], ("newfam-a", "newfam-b"))
    assert default._family_seconds()["newfam"] == default.DEFAULT_WEIGHT
    monkeypatch.setattr(default, "PLAN", (default.PlanRow("x", "no-such-size", "bert-base", "bert-small", 1),))
    with pytest.raises(ValueError, match="names sizes no family declares: no-such-size"):
        default._plan()


def test_main_job_smoke(tmp_path, monkeypatch, capsys):
    """`trifuse bench` with no suite: kernels, families, export; one folder with an index."""
    from tests.test_bert import hf_model
    from trifuse import export
    from trifuse.bench import continuous, default

    # The continuous-batching part, tiny: one model, 3 short requests, 2 clients.
    monkeypatch.setattr(continuous, "QUICK", dict(models=("gpt2-tiny",), requests=3, concurrency=(2,), new=(2, 4)))
    exported, to_onnx = [], export.to_onnx
    # (task, size): the cpu part exports its own model (bert-small), the families' rows theirs.
    monkeypatch.setattr(export, "to_onnx", lambda model, path, **kw: exported.append(
        (model.task, sum(p.numel() for p in model.parameters()))) or to_onnx(model, path, **kw))
    ckpt = tmp_path / "tiny-bert"
    hf_model("bert", "Model").save_pretrained(ckpt)
    monkeypatch.setattr(default, "_plan", lambda: [("bert", "models", (str(ckpt), str(ckpt))),
                                                   ("gpt2", "decoder", ("gpt2-tiny", "gpt2-tiny")),
                                                   ("nope", "no_such_suite", ("x", "y"))])
    rc = trifuse_main(["bench", "--quick", "--batch", "1", "--seq", "16", "--rows", "4", "--widths", "32",
                       "--head-dims", "16", "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    (folder,) = list((tmp_path / "out").iterdir())
    index = (folder / "report.md").read_text()
    assert "report:" in out and str(folder) in out.replace("\n", "")
    assert "Not in this build: nope." in index and "No GPU here" in index
    # The headline comes first, in the console (last thing printed) and at the top of report.md.
    head = index.split("## Environment")[0]
    assert "Finished" in head and "a quick run on" in head and "checks" in head and "ONNX: 2 of 2" in head
    assert "Timing of the Triton kernels needs a GPU; see scripts/device-check.sh" in head
    assert "checks" in out.split("trifuse main job")[-1]
    for name in ("kernels", "attention", "cpu", "models", "decoder", "onnx", "packed", "continuous"):
        assert list(folder.glob(f"{name}-*.json")), name
    for ext in ("csv", "md", "png"):
        assert list(folder.glob(f"continuous-*.{ext}")), ext
    assert "Continuous batching (3 requests, concurrency 2): the engine against static batches of 16: gpt2-tiny " \
           in head and "(ideal " in head
    rows = json.loads(next(folder.glob("continuous-*.json")).read_text())["rows"]
    assert [(r["backend"], r["status"]) for r in rows] == [
        ("trifuse-engine", "checked"), ("static-batches-16", "timed"), ("one-at-a-time", "timed")]
    rows = json.loads(next(folder.glob("packed-*.json")).read_text())["rows"]  # the mixed-length batch
    assert {r["backend"] for r in rows} >= {"trifuse-packed", "trifuse-padded", "hf-eager"}
    assert all(bench_row_passed(r) for r in rows), rows
    assert any(r["op"] == "gpt2-tiny" and "left" in r["shape"] for r in rows)  # a decoder's prompts too
    rows = json.loads(next(folder.glob("models-*.json")).read_text())["rows"]
    assert rows and all(bench_row_passed(r) for r in rows), rows
    assert all(r["threads"] == 1 for r in rows if r.get("median_ms"))  # pinned, recorded
    rows = json.loads(next(folder.glob("decoder-*.json")).read_text())["rows"]
    assert {r["phase"] for r in rows if r["backend"] == "onnxruntime-cpu"} == {"prefill", "decode"}
    # One export per model: the suites' onnxruntime backends and the export step share it.
    assert len(exported) == len(set(exported)), exported
    onnx = json.loads(next(folder.glob("onnx-*.json")).read_text())["rows"]
    assert [r["status"] for r in onnx] == ["verified", "verified"] and all(r["onnx_mb"] > 0 for r in onnx)
    assert not (folder / "onnx").exists()  # deleted once verified (no --keep-onnx)
    assert rc == 0, index


def test_main_job_writes_each_part_and_survives_an_interrupt(tmp_path, monkeypatch):
    """Ctrl-C during the second part: the first part's files and a report saying where it stopped."""
    from trifuse.bench import default
    from trifuse.bench.suite import SuiteResult

    class Kernels:
        @staticmethod
        def run(opts):
            opts.progress("layer_norm 4x32 eager")
            return SuiteResult("kernels", [{"suite": "kernels", "op": "layer_norm", "shape": "4x32",
                                            "backend": "eager", "status": "ok", "median_ms": 1.0,
                                            "p10_ms": 0.9, "p90_ms": 1.1, "numel": 128, "gbps": 1.0}])

    class Attention:
        @staticmethod
        def run(opts):
            raise KeyboardInterrupt

    fakes, real = {"kernels": Kernels, "attention": Attention}, default._suite
    monkeypatch.setattr(default, "_suite", lambda name: fakes.get(name) or real(name))
    opts = Options(device=torch.device("cpu"), dtype=torch.float32, quick=True)
    with pytest.raises(KeyboardInterrupt):
        default.run_main_job(opts, tmp_path)
    (folder,) = list(tmp_path.iterdir())
    index = (folder / "report.md").read_text()
    assert "Interrupted during attention" in index and "All 1 checks passed** (kernels 1/1)" in index
    assert list(folder.glob("kernels-*.json")) and list(folder.glob("kernels-*.md"))
    assert not list(folder.glob("attention-*"))


def test_cli_bench_t5_smoke(tmp_path):
    rc = trifuse_main(["bench", "t5-tiny", "--quick", "--backends", "trifuse", "reference", "hf-eager",
                       "--out", str(tmp_path)])
    assert rc == 0
    (result,) = list(tmp_path.glob("seq2seq-*.json"))
    rows = json.loads(result.read_text())["rows"]
    assert rows and all(bench_row_passed(r) for r in rows), rows


def test_trifuse_bench_without_gpu_checks_kernels_under_the_interpreter(tmp_path):
    """Through the real entry point, in a fresh process without TRITON_INTERPRET set: the
    trifuse rows must be interpreted Triton ("checked"), not the reference path timed."""
    import os
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=repo, CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-c", "import sys; from trifuse.cli import main; sys.exit(main())", "bench", "kernels",
           "--quick", "--rows", "4", "--widths", "32", "--backends", "trifuse", "--out", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads(next(tmp_path.glob("kernels-*.json")).read_text())["rows"]
    assert rows and {r["status"] for r in rows} == {"checked"}, rows


def _ort_rows(suite, name: str) -> dict:
    """``{phase: row}`` of the onnxruntime-cpu backend on one tiny model, one quick shape."""
    opts = Options(device=torch.device("cpu"), dtype=torch.float32, backends=["onnxruntime-cpu"], quick=True)
    rows = suite.run(opts, [name]).rows
    assert {r["backend"] for r in rows} == {"onnxruntime-cpu"}
    return {r["phase"]: r for r in rows}


def test_decoder_suites_onnxruntime_backends():
    """GPT-2 prefill/decode and T5 encoder/decode run in ONNX Runtime, checked against Hugging Face."""
    from trifuse.bench import decoder, seq2seq

    for suite, name, first in ((decoder, "gpt2-tiny", "prefill"), (seq2seq, "t5-tiny", "encoder")):
        rows = _ort_rows(suite, name)
        assert set(rows) == {first, "decode"}, rows
        for row in rows.values():
            assert row["status"] == "ok" or row["status"].startswith("noisy"), row
            assert row["rel_err"] < 1e-4, row
        assert rows[first]["median_ms"] > 0


def test_decoder_suites_trifuse_native_rows_are_timed():
    """On the CPU the trifuse-native rows (the native path, under the interpreter's run as well) are
    checked against Hugging Face and timed, in both phases, beside hf-sdpa's."""
    from trifuse.bench import decoder, seq2seq
    from trifuse.bench.suite import DECODER_CPU_DEFAULT

    assert "trifuse-native" in DECODER_CPU_DEFAULT
    for suite, name, first in ((decoder, "gpt2-tiny", "prefill"), (seq2seq, "t5-tiny", "encoder")):
        opts = Options(device=torch.device("cpu"), dtype=torch.float32, backends=["trifuse-native", "hf-sdpa"],
                       quick=True)
        rows = {(r["backend"], r["phase"]): r for r in suite.run(opts, [name]).rows}
        assert set(rows) == {(b, p) for b in ("trifuse-native", "hf-sdpa") for p in (first, "decode")}, rows
        for (backend, phase), row in rows.items():
            assert row["status"] == "ok" or row["status"].startswith("noisy"), row
            assert row["rel_err"] < 1e-4, row
        assert rows[("trifuse-native", first)]["median_ms"] > 0


def test_onnxruntime_backend_wrong_output_is_a_mismatch(monkeypatch):
    """A runner whose logits are negated: both GPT-2 phases are flagged, neither is timed."""
    from trifuse import export
    from trifuse.bench import decoder

    class Negated(export.OrtRunner):
        def __call__(self, *args, **inputs):
            return {k: -v if k == "logits" else v for k, v in super().__call__(*args, **inputs).items()}

    monkeypatch.setattr(export, "OrtRunner", Negated)
    rows = _ort_rows(decoder, "gpt2-tiny")  # the export from the test above is reused: only sessions are built
    assert {p: r["status"] for p, r in rows.items()} == {"prefill": "mismatch", "decode": "mismatch"}
    assert all(r["rel_err"] > 0.1 and "median_ms" not in r for r in rows.values())


def test_onnxruntime_cpu_default_leaves_out_large_models():
    from trifuse.bench.suite import ORT_CPU_DEFAULT_MAX_PARAMS, model_backends

    large = torch.nn.Linear(ORT_CPU_DEFAULT_MAX_PARAMS, 1, bias=False, device="meta")
    small = torch.nn.Linear(4, 4)
    cpu = Options(device=torch.device("cpu"), dtype=torch.float32)
    backends = ["trifuse", "onnxruntime-cpu"]
    assert model_backends(cpu, backends, large) == ["trifuse"]
    assert model_backends(cpu, backends, small) == backends
    assert model_backends(Options(device=torch.device("cpu"), dtype=torch.float32, backends=backends),
                          backends, large) == backends  # asked for by name: runs on any size
    assert model_backends(Options(device=torch.device("cuda"), dtype=torch.float32), backends, large) == backends


def test_decoder_suites_trifuse_graphs_backend(monkeypatch):
    """The trifuse-graphs decode rows: without a GPU an error row; with the graphs swapped for the
    same steps run eagerly (StaticDecoder), checked against Hugging Face like every backend."""
    import trifuse.engine.graphs as engine_graphs
    from trifuse.bench import decoder, seq2seq

    opts = Options(device=torch.device("cpu"), dtype=torch.float32, backends=["trifuse-graphs"], quick=True)
    rows = decoder.run(opts, ["gpt2-tiny"]).rows
    assert [(r["phase"], r["status"]) for r in rows] == [
        ("decode", "error: ValueError: CUDA graphs need the model on a CUDA device; it is on cpu")]
    monkeypatch.setattr(engine_graphs, "CUDAGraphDecoder", engine_graphs.StaticDecoder)
    for suite, name in ((decoder, "gpt2-tiny"), (seq2seq, "t5-tiny")):
        rows = suite.run(opts, [name]).rows
        assert [r["phase"] for r in rows] == ["decode"], rows  # no prefill / encoder row of its own
        assert rows[0]["status"] == "checked" and rows[0]["rel_err"] < 1e-5, rows  # interpreted: not timed


def test_packed_headline_figure_from_clean_timings_only():
    from trifuse.bench.packed import headline_figure, lengths

    lens = lengths(batch=32, median=24, sigma=1.0, max_len=256, seed=0)
    assert len(lens) == 32 and 1 <= min(lens) and max(lens) <= 256
    base = dict(shape="32x181 (1002 real)", ideal_ratio=5.78, status="ok")
    rows = [dict(base, backend="trifuse-packed", median_ms=100.0, tokens_per_s=10020.0, speedup_vs_hf_sdpa=4.1,
                 packed_vs_padded=5.0, frac_of_ideal=5.0 / 5.78),
            dict(base, backend="hf-sdpa", median_ms=410.0)]
    assert headline_figure(rows) == ("Mixed-length batch (32x181 (1002 real), 5.8x padding): trifuse packed "
                                     "10,020 tokens/s, 4.10x Hugging Face SDPA, 5.00x trifuse padded (87% of "
                                     "the ideal 5.8x).")
    rows[0]["status"] = "noisy: spread"
    assert headline_figure(rows) is None


def test_cpu_suite_every_precision_and_peer(tmp_path):
    """bench/cpu.py: trifuse fp32/bf16/int8 beside Hugging Face, ONNX Runtime (and OpenVINO when
    installed), each row checked against float64 before it is timed, with its fraction of the ceiling."""
    from tests.test_bert import hf_model
    from trifuse.bench import cpu

    ckpt = tmp_path / "tiny-bert"
    hf_model("bert", "Model").save_pretrained(ckpt)
    opts = Options(device=torch.device("cpu"), dtype=torch.float32, quick=True, seq=[16], batch=[1, 3])
    res = cpu.run(opts, [str(ckpt)])
    backends = {r["backend"] for r in res.rows}
    assert {"trifuse-fp32", "trifuse-bf16", "trifuse-int8", "hf-sdpa-bf16", "onnxruntime-int8"} <= backends
    assert all(bench_row_passed(r) for r in res.rows), [(r["backend"], r["status"]) for r in res.rows]
    assert {"matmul_fp32_gflops", "matmul_bf16_gflops", "matmul_int8_gflops"} <= set(res.ceilings)
    for r in res.rows:
        assert r["frac_of_peak"] > 0 and r["threads"] == 1 and r["cosine"] >= cpu.BUDGET[r["dtype"]][1]
    lines = cpu.headline_lines(res.rows)
    assert len(lines) == 2 and "fp32" in lines[0] and "int8" in lines[0] and "x Hugging Face" in lines[0]
    with pytest.raises(SystemExit, match="unknown backend"):
        cpu.run(Options(device=torch.device("cpu"), dtype=torch.float32, backends=["nope"]), [str(ckpt)])


def test_continuous_part_headline_and_a_mismatch_fails(monkeypatch):
    """The main job's continuous-batching part (bench/continuous.py): on the CPU an engine whose tokens
    differ from one-at-a-time generation is a failed check; the headline compares at the top concurrency."""
    from trifuse.bench import continuous
    from trifuse.bench.default import _passed

    def row(mode, c, tps, p50, p99, status="timed"):
        return dict(model="gpt2-tiny", mode=mode, concurrency=c, requests=24, tokens_per_s=tps, p50_s=p50,
                    p99_s=p99, ideal_engine_vs_static=2.31, status=status,
                    backend={"engine": "trifuse-engine", "static": "static-batches-16"}[mode])

    rows = [row("engine", 8, 300.0, 0.5, 0.9, "differs: 23 of 24 requests equal one-at-a-time's"),
            row("static", 8, 200.0, 0.6, 1.0), row("engine", 64, 400.0, 0.7, 1.1, "checked"),
            row("static", 64, 100.0, 1.4, 2.2)]
    monkeypatch.setattr(continuous, "device_rows", lambda *a, **k: [dict(r) for r in rows])
    res = continuous.run(Options(device=torch.device("cpu"), dtype=torch.float32, quick=True))
    assert [r["status"] for r in res.rows] == ["mismatch", "timed", "checked", "timed"]
    assert res.rows[0]["detail"].startswith("differs: 23 of 24") and _passed(res.rows[0]) is False
    assert continuous.headline_line(res.rows) == (
        "Continuous batching (24 requests, concurrency 64): the engine against static batches of 16: gpt2-tiny "
        "4.00x tokens/s (ideal 2.31x), p50 0.70 s vs 1.40 s, p99 1.10 s vs 2.20 s.")
    with pytest.raises(SystemExit):
        continuous.main(["--new", "5,2"])
