"""scripts/device-check.sh: the prepared GPU run, rehearsed on the CPU (``--dry-run``).

The dry run goes through every stage the GPU run does (subprocess per stage, deadlines,
rows streamed to disk, the JSON, summary and plots) with tiny shapes, so the run on a
lent GPU can only fail for GPU reasons. The summary's arithmetic (pairs, goals, the
closing table) is checked on synthetic GPU rows, since a CPU run times no kernel.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trifuse.bench import device
from trifuse.bench.device import runner, stages

REPO = Path(__file__).resolve().parent.parent


def test_dry_run_every_stage_and_a_timeout(tmp_path):
    """The whole rehearsal, with the first stage given a deadline no process can meet: it is
    recorded as ``timeout`` and every later stage still runs and writes its rows."""
    out = tmp_path / "dc"
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "TRITON_INTERPRET")}
    env["PYTHON"] = sys.executable
    proc = subprocess.run([str(REPO / "scripts" / "device-check.sh"), "--dry-run", "--out", str(out),
                           "--budget", "400", "--deadline", "environment=0.001"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]  # a timed-out stage fails the run
    doc = json.loads((out / "device-check.json").read_text())
    assert doc["dry_run"] is True
    assert [s["name"] for s in doc["stages"]] == list(device.STAGE_NAMES)
    for s in doc["stages"]:
        assert set(s) >= {"name", "status", "seconds", "rows"}
        assert s["status"] in ("ok", "failed", "timeout", "skipped")
    status = {s["name"]: s["status"] for s in doc["stages"]}
    assert status == {"environment": "timeout", "gpu-tests": "ok", "kernels": "ok", "models": "ok",
                      "memcheck": "skipped"}, [(s["name"], s.get("error")) for s in doc["stages"]]
    rows = {s["name"]: s["rows"] for s in doc["stages"]}
    # On the CPU the gpu-marked tests skip; each is a row, streamed by the pytest plugin.
    assert rows["gpu-tests"] and all(r["outcome"] == "skipped" for r in rows["gpu-tests"])
    # The kernels stage: attention (every variant), norms/GELU and the padding-mask rows; our
    # kernels are checked (interpreted), the peers timed.
    ops = {r.get("op") for r in rows["kernels"]}
    assert {"attn", "attn-causal", "attn-t5", "attn-t5-causal", "decode", "layer_norm", "attn-mask",
            "attn-mask-ones"} <= ops
    ours = [r for r in rows["kernels"] if r.get("backend") == "trifuse"]
    assert ours and all(r["status"] == "checked" for r in ours)
    assert {r["item"] for r in rows["models"]} == {"bert tiny B1 S16", "vit tiny B1", "gpt2-tiny B1 ctx16",
                                                    "t5-tiny B1 S16"}
    assert all(r["status"] == "checked" for r in rows["models"] if r.get("backend") == "trifuse")
    assert rows["memcheck"] == [{"check": "workload without compute-sanitizer", "exit_code": 0}]
    files = {p.name for p in out.iterdir()}
    written = {"device-check.json", "summary.md", "device-check.log", "rows.jsonl"}
    plots = {"attention.png", "kernels.png", "models.png"}
    assert written | {"attention.png"} <= files <= written | plots  # the documented files, nothing else
    assert all(p.is_file() for p in out.iterdir())
    summary = (out / "summary.md").read_text()
    assert "| environment | timeout |" in summary
    linked = {line for line in summary.splitlines() if line.startswith("![")}
    assert linked == {f"![{png}]({png})" for png in files & plots}  # every plot made is linked, none missing
    tail = proc.stdout.strip().splitlines()[-40:]
    assert any(line.startswith("environment  timeout") for line in tail)
    assert any(line.startswith("goals (issue 20)") for line in tail)


def test_environment_stage_in_process(tmp_path, monkeypatch):
    rows_file = tmp_path / "rows.jsonl"
    monkeypatch.setenv("TRIFUSE_DEVICE_ROWS", str(rows_file))
    assert stages.stage_environment(stages.Ctx(60, dry_run=True))
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    assert [r["what"] for r in rows] == ["device", "versions", "ceiling", "ceiling"]
    assert rows[2]["name"] == "copy_gbps" and rows[2]["value"] > 0
    assert runner.device_record(rows)["copy_gbps"] == rows[2]["value"]


def test_stage_items_skip_what_the_budget_cannot_hold(tmp_path, monkeypatch):
    monkeypatch.setenv("TRIFUSE_DEVICE_ROWS", str(tmp_path / "rows.jsonl"))
    monkeypatch.setenv("TRIFUSE_DEVICE_STAGE", "kernels")
    ctx = stages.Ctx(30, dry_run=True)
    ran = []
    clean = ctx.items([("small", 1, lambda: ran.append(1) or [{"backend": "trifuse", "status": "checked"}]),
                       ("too big", 10_000, lambda: ran.append(2) or []),
                       ("broken", 1, lambda: 1 / 0)])
    rows = runner.read_rows(tmp_path / "rows.jsonl", "kernels")
    assert ran == [1] and not clean
    assert rows[0] == {"item": "small", "backend": "trifuse", "status": "checked"}
    assert rows[1]["item"] == "too big" and rows[1]["status"].startswith("skipped: needs ~10000 s")
    assert rows[2]["status"].startswith("error: ZeroDivisionError")


def test_deadlines_share_what_is_left():
    plan = list(device.STAGES)
    total = sum(s.weight for s in plan)
    assert runner.stage_deadline(480, plan, 0, {}) == pytest.approx(480 * plan[0].weight / total)
    # time a stage did not use rolls over to the ones after it
    later = runner.stage_deadline(480, plan[2:], 100, {})
    assert later == pytest.approx(380 * plan[2].weight / sum(s.weight for s in plan[2:]))
    assert runner.stage_deadline(480, plan, 0, {"environment": 3.0}) == 3.0
    with pytest.raises(SystemExit, match="STAGE=SECONDS"):
        runner.parse_overrides(["bogus=1"])


def _gpu_doc():
    """A device-check.json as a GPU run writes it (figures made up, shaped like the suites' rows)."""
    att = []
    for op, ours_ms, flash_ms in (("attn", 1.0, 1.2), ("attn-causal", 0.6, 0.5)):
        for backend, ms in (("trifuse", ours_ms), ("sdpa-flash", flash_ms)):
            att.append({"suite": "attention", "op": op, "shape": "8x16x2048x2048x128", "dtype": "fp16", "d": 128,
                        "lq": 2048, "backend": backend, "status": "ok", "median_ms": ms, "cold_ms": 900.0,
                        "tflops": 550 / ms, "frac_of_peak": 550 / ms / 800, "ceiling_copy_gbps": 4000.0})
    att.append({"suite": "attention", "op": "attn-t5", "shape": "8x16x2048x2048x128", "dtype": "fp16", "d": 128,
                "lq": 2048, "backend": "trifuse", "status": "ok", "median_ms": 1.05})
    att.append({"suite": "attention", "op": "attn-t5", "shape": "8x16x2048x2048x128", "dtype": "fp16", "d": 128,
                "lq": 2048, "backend": "sdpa-dense-bias", "status": "ok", "median_ms": 2.0})
    norms = [{"suite": "kernels", "op": "add_layer_norm", "shape": "16384x4096", "dtype": "fp16", "backend": "trifuse",
              "status": "ok", "median_ms": 0.1, "gbps": 3600.0, "frac_of_peak": 0.9}]
    models = [{"suite": "models", "op": "bert-base", "shape": "1x128", "dtype": "fp16", "backend": b, "status": "ok",
               "median_ms": ms} for b, ms in (("trifuse", 0.6), ("trifuse-graphs", 0.4), ("hf-eager", 2.4))]
    models.append({"suite": "models", "op": "bert-base", "shape": "1x128", "dtype": "fp16", "backend": "torch-compile",
                   "status": "ok", "median_ms": 0.8, "item": "bert-base torch.compile"})
    stage = lambda name, rows, status="ok": {"name": name, "status": status, "seconds": 10.0, "rows": rows}  # noqa
    return {"device": {"name": "NVIDIA H200", "sm_count": 132, "copy_gbps": 4000.0}, "dry_run": False,
            "budget_s": 480, "started": "now", "command": "scripts/device-check.sh", "stages": [
                stage("environment", []),
                stage("gpu-tests", [{"test": "tests/test_attention.py::test_bf16[x]", "outcome": "failed",
                                     "message": "AssertionError"},
                                    {"test": "tests/test_norm.py::test_a", "outcome": "passed"}], "failed"),
                stage("kernels", att + norms), stage("models", models), stage("memcheck", [], "skipped")]}


def test_summary_pairs_and_goals_from_gpu_rows(tmp_path):
    doc = _gpu_doc()
    pairs = {p["op"]: p for p in device.attention_pairs(doc["stages"][2]["rows"])}
    assert pairs["attn"]["peer"] == "sdpa-flash" and pairs["attn"]["speedup"] == pytest.approx(1.2)
    assert pairs["attn-causal"]["speedup"] == pytest.approx(0.5 / 0.6)
    assert pairs["attn-t5"]["peer"] == "sdpa-dense-bias"
    (bert,) = device.model_pairs(doc["stages"][3]["rows"])
    assert bert["best_ours"] == "trifuse-graphs" and bert["vs_eager"] == pytest.approx(6.0)
    assert bert["vs_compile"] == pytest.approx(2.0)
    g = {goal: (measured, ok) for goal, measured, ok in device.goals(doc)}
    assert g["attention >= best SDPA backend at every shape"][1] is False  # causal lost to flash
    assert g["T5 in-kernel bias <= 10% slower than no bias"][1] is True  # 1.05x
    assert g["T5 bias >= 1.3x SDPA with the materialized bias"][1] is True
    assert g["BERT-base B1 S128 <= 0.5 ms"] == ("0.400 ms", True)
    assert g["norms >= 85% of copy bandwidth at width >= 4096"][1] is True
    assert g["decode >= 70% of copy bandwidth"][1] is None  # no decode rows: said, not guessed
    lines = device.compact_table(doc, tmp_path)
    assert len(lines) <= 45
    text = "\n".join(lines)
    assert "gpu-tests    failed" in text and "test_bf16[x]" in text
    assert "[not met] attention >= best SDPA backend" in text
    md = device.summary_markdown(doc, device.write_plots(doc, tmp_path))
    assert "## Failed GPU tests" in md and "sdpa-dense-bias" in md
    assert (tmp_path / "attention.png").exists() and (tmp_path / "models.png").exists()
