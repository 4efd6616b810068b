"""The main job, ``trifuse bench`` with no suite named: the whole engine on whatever is here.

1. the kernel suites (norms, GELU, attention): each kernel checked against a float64
   reference, then timed against PyTorch;
2. every model family (random weights from the named configs): each backend checked
   against Hugging Face eager, then timed; then the family's small model exported to
   ONNX and verified in ONNX Runtime against PyTorch (on a GPU, ``--full``: the base
   size too). The ONNX files are deleted once verified unless ``--keep-onnx``;
3. the mixed-length batch (bench/packed.py): trifuse packed and padded against Hugging
   Face and ONNX Runtime; the headline carries packed against Hugging Face SDPA;
4. continuous batching (bench/continuous.py): GPT-2 and T5 requests served by the
   generation engine, by static batches of 16 and one at a time, the engine's tokens
   checked against one-at-a-time generation; the headline carries engine vs static.

``--quick`` (the default without a GPU) checks every kernel and family at one small
size and times briefly; ``--full`` (the default on a GPU) runs every suite's sweep
and each family at a small and a base size.

Everything lands in one folder, written as each part finishes (an interrupted run keeps
what it did): each suite's JSON/CSV/markdown/PNG and an index, ``report.md``, whose
headline says what ran, what passed, what was timed and the figures that matter.
On a machine without a GPU the Triton kernels are checked under Triton's interpreter
rather than timed, and the headline says that their timing needs a GPU.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib
import math
import os
import resource
import shutil
import threading
import time
from pathlib import Path
from typing import Optional

import torch

from . import report
from .env import device_slug, environment
from .suite import DTYPE_NAMES, Options, SuiteResult, cpu_note, error_status, onnx_export, release_exports

#: The model suite of each kind of family (engine.family).
SUITE_OF_KIND = {"encoder": "models", "vision": "vision", "decoder": "decoder", "seq2seq": "seq2seq"}


@dataclasses.dataclass(frozen=True)
class PlanRow:
    """One model row of the main job: sizes from a family's ``named_sizes`` (random weights)."""

    label: str  # the report's row (and progress part) name
    small: str  # checked and timed by --quick, exported to ONNX and verified
    base: str  # added by --full
    quick: str  # what a --quick run without a GPU checks: Triton's interpreter gets through it in seconds
    seconds: float  # a --quick CPU run of the row (measured on 2 shared cores): the progress estimate


#: The main job's model rows, in report order. A family with no row here still runs, at its first
#: named size (``_rows``); a row picks sizes the report compares and says how long the row takes.
PLAN = (
    PlanRow("bert", "bert-small", "bert-base", "bert-small", 20),
    PlanRow("roberta", "roberta-small", "roberta-base", "roberta-small", 20),
    PlanRow("distilbert", "distilbert-small", "distilbert-base", "distilbert-small", 17),
    PlanRow("albert", "albert-small", "albert-base", "albert-small", 14),
    PlanRow("electra", "electra-small", "electra-base", "electra-small", 18),
    PlanRow("gpt2", "gpt2-tiny", "gpt2", "gpt2-tiny", 15),
    PlanRow("t5", "t5-small", "t5-base", "t5-tiny", 27),
    PlanRow("vit", "vit-small-patch16-224", "vit-base-patch16-224", "vit-tiny", 14),
    PlanRow("bart", "bart-base", "bart-large", "bart-tiny", 20),
)


def _rows() -> list:
    """``(PlanRow, its family)`` for every row of :data:`PLAN`, then a default row (first named sizes) for
    each registered family that has none: a new family is in the main job without touching this file."""
    from trifuse.engine.registry import families, named_sizes

    sizes = named_sizes()
    rows = []
    for row in PLAN:
        unknown = [n for n in (row.small, row.base, row.quick) if n not in sizes]
        if unknown:
            raise ValueError(f"bench plan row {row.label!r} names sizes no family declares: {', '.join(unknown)}")
        fams = {sizes[n][0].name for n in (row.small, row.base, row.quick)}
        if len(fams) != 1:
            raise ValueError(f"bench plan row {row.label!r} mixes families: {', '.join(sorted(fams))}")
        rows.append((row, sizes[row.small][0]))
    planned = {fam.name for _, fam in rows}
    for fam in families():
        if fam.name not in planned and fam.named_sizes:
            names = list(fam.named_sizes)
            rows.append((PlanRow(fam.name, names[0], names[min(1, len(names) - 1)], names[0], DEFAULT_WEIGHT),
                         fam))
    return rows


def _plan() -> list:
    """``(label, suite module, (small size, base size))`` per model row of the main job."""
    return [(row.label, SUITE_OF_KIND[fam.kind], (row.small, row.base)) for row, fam in _rows()]


def _family_seconds() -> dict:
    return {row.label: row.seconds for row, _ in _rows()}


def _quick_cpu_sizes() -> dict:
    """A --quick run without a GPU checks each row at its quick size: a toy size where Triton's
    interpreter would take minutes over the small one (T5's decoder, ViT's 197 tokens), else the small size."""
    return {row.label: row.quick for row, _ in _rows() if row.quick != row.small}


# Seconds of each part of a --quick CPU run (its CPU time, measured on a shared 2-core machine,
# which is about its wall time on 2 idle cores), for the progress display's estimate; a part not
# listed counts as DEFAULT_WEIGHT. The estimate is rescaled by how the finished parts compared.
WEIGHTS = {"kernels": 18, "attention": 13, "cpu": 45, "packed": 60, "continuous": 20}  # the model rows': PLAN's seconds
DEFAULT_WEIGHT = 20
FULL_FACTOR = 3  # --full on a CPU: base sizes and whole sweeps

DEVICE_CHECK = "scripts/device-check.sh"
#: Parts whose rows are not the model families' (kept out of the speedup figures).
NOT_MODELS = ("kernels", "attention", "cpu", "onnx", "packed", "continuous")


def _suite(module: str):
    try:
        return importlib.import_module(f"trifuse.bench.{module}")
    except ModuleNotFoundError:
        return None


# ----------------------------------------------------------------------------
# ONNX export and verification of one model


def _export_row(opts: Options, module: str, name: str, onnx_dir: Path, keep: bool) -> dict:
    """Export ``name`` to ONNX (or reuse the export its suite's onnxruntime backend made) and
    verify it in ONNX Runtime against PyTorch; the files are deleted unless ``keep``."""
    row = {"suite": "onnx", "op": name, "shape": "-", "dtype": "fp32", "backend": "onnxruntime"}
    try:
        from trifuse import engine, export, kernels

        verify = export.verify
    except (ImportError, AttributeError) as e:
        return {**row, "status": f"skipped: ONNX export is not available in this build ({e})"}
    folder = onnx_dir / Path(name).name  # name may be a checkpoint path
    try:
        cpu = torch.device("cpu")  # exported in fp32 from the CPU; verified on ONNX Runtime's CPU provider
        hf = _suite(module).build_hf(name, torch.float32, cpu, "eager")
        model = engine.from_pretrained(hf, dtype=torch.float32, device="cpu")
        paths, row["export_s"] = onnx_export(hf, model.task, model=model)
        paths = _link_files(paths, folder)
        row["onnx_mb"] = sum(p.stat().st_size for p in folder.iterdir()) / 1e6
        t0 = time.perf_counter()
        # PyTorch's side on the reference ops, as it is on a GPU machine (the model is on the CPU):
        # without a GPU the kernels would run interpreted, which the model suites check already.
        with kernels.use_backend("reference"):
            result = verify(paths, model)  # T5: the (encoder, decoder) pair to_onnx wrote
        row["verify_s"] = time.perf_counter() - t0
        row.update(_verification_fields(result))
    except Exception as e:  # noqa: BLE001 - a model that does not export is a result
        row["status"] = error_status(e)
    finally:
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)
    return row


def _link_files(paths: tuple[Path, ...], folder: Path) -> tuple[Path, ...]:
    """Hard-link (or copy) every file of one export, weights files included, into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for src in paths[0].parent.iterdir():
        dest = folder / src.name
        dest.unlink(missing_ok=True)
        try:
            os.link(src, dest)
        except OSError:  # another file system
            shutil.copy2(src, dest)
    return tuple(folder / p.name for p in paths)


def _verification_fields(result) -> dict:
    """Status and worst errors of an ``export.VerifyReport``."""
    fields = {"status": "verified" if result.ok else "mismatch"}
    if result.rows:
        fields["max_abs_err"] = max(r.max_abs for r in result.rows)
        fields["rel_err"] = max(r.max_rel for r in result.rows)
    return fields


# ----------------------------------------------------------------------------
# Progress: a live display on a terminal, plain lines otherwise


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
    """What runs, how far (parts done of all), elapsed and an estimate of what is left.

    On a terminal a ``rich`` live display (a bar over the parts and a line naming the step
    that runs); otherwise one line when a part starts or ends and, while a part runs, one line
    (the step that runs now) every ``heartbeat_s``, so a log shows the run is alive without
    drowning in it.
    """

    def __init__(self, parts: list[tuple[str, float]], heartbeat_s: float = 30.0):
        self.parts = parts
        self.total = sum(w for _, w in parts)
        self.done_weight = 0.0
        self.done_expected, self.done_actual = 0.0, 0.0
        self.index, self.name, self.part_t0 = 0, "", 0.0
        self.t0 = time.perf_counter()
        self.heartbeat_s, self.what = heartbeat_s, ""
        self.live = self.ticker = None
        self.stopped = threading.Event()
        if report.console.is_terminal:
            from rich.progress import BarColumn, ProgressColumn, SpinnerColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as RichProgress
            from rich.text import Text

            outer = self

            class Eta(ProgressColumn):  # recomputed at every refresh, not only when a step starts
                def render(self, task):
                    return Text(outer.eta() if task.id == outer.bar else "", style="cyan")

            self.live = RichProgress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(bar_width=24),
                                     TextColumn("{task.fields[count]}"), TimeElapsedColumn(), Eta(),
                                     console=report.console, transient=True)
            self.bar = self.live.add_task("main job", total=self.total, count="")
            self.now = self.live.add_task("", total=None, count="", visible=False)

    def __enter__(self) -> "Progress":
        if self.live is not None:
            self.live.start()
        else:
            self.ticker = threading.Thread(target=self._tick, name="trifuse-progress", daemon=True)
            self.ticker.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        if self.live is not None:
            self.live.stop()
        if self.ticker is not None:
            self.ticker.join()

    def _tick(self) -> None:
        """Plain output: the step that runs now, every ``heartbeat_s`` while a part runs."""
        while not self.stopped.wait(self.heartbeat_s):
            if self.name:
                report.console.print(f"[{_clock(time.perf_counter() - self.t0)}]   {self.name}: "
                                     f"{self.what or 'starting'} ({self.eta()})")

    def eta(self) -> str:
        """Time left: the parts to come by their weights and the current part's weight less its time
        so far (not below zero), scaled by how the finished parts compared with their weights."""
        # 60 s of prior belief in the weights, so that one fast or slow part does not swing the estimate.
        scale = (self.done_actual + 60) / (self.done_expected + 60)
        current = self.parts[self.index][1] if self.name and self.index < len(self.parts) else 0.0
        later = self.total - self.done_weight - current
        in_part = time.perf_counter() - self.part_t0 if self.name else 0.0
        left = later * scale + max(current * scale - in_part, 0.0)
        return f"about {_clock(left)} left"

    def start(self, name: str) -> None:
        self.name, self.part_t0, self.what = name, time.perf_counter(), ""
        self.part_cpu0 = _cpu_seconds()
        n = f"{self.index + 1}/{len(self.parts)}"
        if self.live is not None:
            self.live.update(self.bar, description=f"[bold]{name}", count=f"part {n}")
            self.live.update(self.now, description=f"  {name}: starting", visible=True)
        else:
            report.console.print(f"[{_clock(time.perf_counter() - self.t0)}] part {n}: {name} ({self.eta()})")

    def step(self, what: str) -> None:
        """The callback the suites call (``Options.progress``) with what they run now."""
        self.what = what
        if self.live is not None:
            self.live.update(self.now, description=f"  {what}")

    def finish(self, summary: str) -> tuple[float, float]:
        """End the current part: ``(wall seconds, CPU seconds)`` it took."""
        took = time.perf_counter() - self.part_t0
        cpu = _cpu_seconds() - self.part_cpu0
        weight = self.parts[self.index][1]
        self.done_weight += weight
        self.done_expected += weight
        self.done_actual += took
        self.index += 1
        if self.live is not None:
            self.live.update(self.bar, completed=self.done_weight)
            self.live.update(self.now, visible=False)
        report.console.print(f"[{_clock(time.perf_counter() - self.t0)}] {self.name}: {summary} "
                             f"({took:.0f} s, {cpu:.0f} s of CPU)")
        self.name = ""
        return took, cpu


# ----------------------------------------------------------------------------
# The headline


def _passed(row: dict) -> Optional[bool]:
    """True: the check passed (checked, timed, noisy, verified); False: a mismatch or an error;
    None: nothing was checked (skipped)."""
    status = str(row.get("status", ""))
    if status in ("ok", "checked", "verified") or status.startswith("noisy"):
        return True
    if status == "mismatch" or status.startswith("error"):
        return False
    return None


def _ours(row: dict) -> bool:
    """A row of trifuse's own code: its kernels, its reference path, its ONNX export."""
    b = row.get("backend", "")
    return b.startswith("trifuse") or b in ("reference", "onnxruntime", "suite") or row.get("suite") == "onnx"


def _geomean(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def _speedup_figure(rows: list[dict], backend: str, label: str) -> Optional[str]:
    sp = [r["speedup_vs_hf_eager"] for r in rows if r.get("backend") == backend and r.get("speedup_vs_hf_eager")]
    if not sp:
        return None
    rng = f" (from {min(sp):.2f}x to {max(sp):.2f}x)" if len(sp) > 1 else ""
    return f"{label} against Hugging Face eager: {_geomean(sp):.2f}x, geometric mean of {len(sp)} clean timing(s){rng}."


def _gpu_figures(results: dict) -> list[str]:
    figures = []
    models = [r for n, res in results.items() if n not in NOT_MODELS
              for r in res.rows]
    fig = _speedup_figure(models, "trifuse", "Models, trifuse")
    if fig:
        figures.append(fig)
    for name, what in (("kernels", "norm/GELU kernels"), ("attention", "attention")):
        res = results.get(name)
        mine = [r for r in (res.rows if res else []) if r.get("backend") == "trifuse" and report.is_result(r)
                and r.get("frac_of_peak") is not None]
        if mine:
            best = max(mine, key=lambda r: r["frac_of_peak"])
            worst = min(mine, key=lambda r: r["frac_of_peak"])
            figures.append(f"{what[0].upper() + what[1:]}: {worst['frac_of_peak']:.0%} to "
                           f"{best['frac_of_peak']:.0%} of the "
                           f"measured ceiling (best: {best['op']} {best['shape']}).")
    decode = [r for r in models if r.get("backend") == "trifuse" and r.get("phase") == "decode" and report.is_result(r)]
    if decode:
        r = min(decode, key=lambda r: (r["batch"], r["seq"]))
        figures.append(f"Decode: {r['op'].removesuffix(' decode')} {r['median_ms']:.3f} ms/token at batch "
                       f"{r['batch']}, context {r['seq']}.")
    return figures


def headline(results: dict, env: dict, opts: Options, state: str, wall_s: float, cpu_s: float) -> list[str]:
    """The lines a reader needs first: machine, what was checked and passed, what was timed, the
    figures that matter. ``state``: "finished", "still running (...)" or "interrupted during <part>"."""
    rows = [r for res in results.values() for r in res.rows]
    checked = [r for r in rows if _passed(r) is not None]
    failed = [r for r in checked if _passed(r) is False]
    ours_failed = [r for r in failed if _ours(r)]
    timed = [r for r in rows if r.get("median_ms") and not str(r.get("status", "")).startswith("error")]
    noisy = [r for r in timed if str(r.get("status", "")).startswith("noisy")]
    gpu = opts.on_gpu
    cpus = os.cpu_count()
    machine = (f"{env['device']}" + (f" ({cpus} CPUs; CPU timings on {opts.cpu_threads} intra-op "
                                     f"thread{'s' if opts.cpu_threads > 1 else ''})" if not gpu else ""))
    lines = [f"**{state[0].upper() + state[1:]}** after {_clock(wall_s)} of wall time and {_clock(cpu_s)} of CPU "
             f"time (all threads), a {'quick' if opts.quick else 'full'} run on {machine}."]
    per_part = ", ".join(f"{n} {sum(_passed(r) is True for r in res.rows)}/"
                         f"{sum(_passed(r) is not None for r in res.rows)}" for n, res in results.items())
    if not failed:
        lines.append(f"**All {len(checked)} checks passed** ({per_part}).")
    else:
        who = "trifuse's own" if ours_failed else "peers' only (trifuse's passed)"
        worst = "; ".join(f"{r['backend']} {r['op']} {r['shape']}: {r['status'][:60]}" for r in failed[:3])
        lines.append(f"**{len(failed)} of {len(checked)} checks FAILED**, {who}: {worst}"
                     f"{' ...' if len(failed) > 3 else ''} ({per_part}).")
    onnx = results.get("onnx")
    if onnx and onnx.rows:
        ok = sum(r.get("status") == "verified" for r in onnx.rows)
        lines.append(f"ONNX: {ok} of {len(onnx.rows)} models exported and verified in ONNX Runtime against PyTorch.")
    if timed:
        load = [r.get("load_after") for r in noisy if r.get("load_after") is not None]
        why = f" (load average up to {max(load):.1f} on {cpus} CPUs)" if load else ""
        lines.append(f"Timed: {len(timed)} measurements" + (
            f", **{len(noisy)} flagged noisy**{why}: shown as noisy, never as a result or in a speedup."
            if noisy else ", none noisy."))
    packed = results.get("packed")
    fig = _suite("packed").headline_figure(packed.rows) if packed else None
    if fig:
        lines.append(fig)
    continuous = results.get("continuous")
    fig = _suite("continuous").headline_line(continuous.rows) if continuous and continuous.rows else None
    if fig:
        lines.append(fig)
    if gpu:
        lines += _gpu_figures(results)
    else:
        lines.append(f"**Timing of the Triton kernels needs a GPU; see {DEVICE_CHECK}.** Here they are checked "
                     "under Triton's interpreter, and only the PyTorch paths are timed, on the CPU.")
        models = [r for n, res in results.items() if n not in NOT_MODELS
                  for r in res.rows]
        fig = _speedup_figure(models, "reference", "On this CPU, trifuse's own path (its reference ops)")
        if fig:
            lines.append(fig)
        fig = _speedup_figure(models, "trifuse-native", "On this CPU, trifuse's native CPU path")
        if fig:
            lines.append(fig)
        if results.get("cpu"):
            from .cpu import headline_lines

            lines += headline_lines(results["cpu"].rows)
    return lines


# ----------------------------------------------------------------------------
# The job


def _cpu_seconds() -> float:
    """CPU time of this process and its children, every thread: what the run cost the machine."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _merge(prev: Optional[SuiteResult], res: SuiteResult) -> SuiteResult:
    if prev is None:
        return res
    return SuiteResult(prev.title, prev.rows + res.rows, {**prev.ceilings, **res.ceilings},
                       prev.notes + [n for n in res.notes if n not in prev.notes])


def write_plot(name: str, rows: list[dict], path: Path) -> list[Path]:
    """A suite's own plot (its ``plot_rows(rows, path)``, e.g. bench/continuous.py's) where the report's
    generic ones draw nothing for its rows: ``[path]`` when it drew one."""
    module = _suite(name)
    return [path] if rows and hasattr(module, "plot_rows") and module.plot_rows(rows, path) else []


def _run_part(part: str, run, *args) -> SuiteResult:
    """A suite's result, or one error row when the suite itself raised (the run goes on)."""
    try:
        return run(*args)
    except Exception as e:  # noqa: BLE001 - a suite that crashes is a failed result, not a lost run
        return SuiteResult(f"{part} (crashed)", [{"suite": part, "op": part, "shape": "-", "backend": "suite",
                                                   "status": error_status(e)}])


def summary(rows: list[dict]) -> str:
    """``12/12 passed, 3 noisy timing(s)``: one part's outcome in a line."""
    passed = sum(_passed(r) is True for r in rows)
    checked = sum(_passed(r) is not None for r in rows)
    noisy = sum(str(r.get("status", "")).startswith("noisy") for r in rows)
    text = f"{passed}/{checked} passed"
    return text + (f", {noisy} noisy timing(s)" if noisy else "")


def run_main_job(opts: Options, out_root: Path, *, keep_onnx: bool = False,
                 wide: bool = False) -> tuple[Path, bool]:
    """Run everything; return the report folder and whether any of trifuse's checks failed.

    ``opts.quick``: the short run (see the module docstring). Results are written as each part
    finishes; on Ctrl-C the report says where the run stopped, and KeyboardInterrupt propagates.
    """
    env = environment(str(opts.device))
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    dtype = DTYPE_NAMES[opts.dtype]
    folder = out_root / f"{stamp}-{device_slug(env)}-{dtype}"
    folder.mkdir(parents=True, exist_ok=True)
    gpu, quick = opts.on_gpu, opts.quick
    t0, cpu0 = time.perf_counter(), _cpu_seconds()
    results: dict[str, SuiteResult] = {}
    took: dict[str, tuple[float, float]] = {}  # (wall, CPU) seconds per part, for the index
    missing: list[str] = []
    onnx_dir = folder / "onnx"
    scale = 1 if (quick or gpu) else FULL_FACTOR
    full_plan, quick_cpu = _plan(), _quick_cpu_sizes()
    plan = [(f, m, s) for f, m, s in full_plan if _suite(m) is not None]
    weights = {**_family_seconds(), **WEIGHTS}
    missing = [f for f, m, _ in full_plan if _suite(m) is None]
    first = ("kernels", "attention") if gpu else ("kernels", "attention", "cpu")  # cpu: bench/cpu.py
    parts = [(n, weights.get(n, DEFAULT_WEIGHT) * scale) for n in first]
    # The mixed-length batch (bench/packed.py) runs right after the first text encoder, on its size,
    # while that model's ONNX export is still at hand.
    packed_after = next((f for f, m, _ in plan if m == "models"), None)
    for f, _, _ in plan:
        parts.append((f, weights.get(f, DEFAULT_WEIGHT) * scale))
        if f == packed_after:
            parts.append(("packed", weights["packed"] * scale))
    last = ("continuous",)  # bench/continuous.py: the generation engine against static batches
    parts += [(n, weights[n] * scale) for n in last]

    report.console.print(
        f"[bold]Main job[/] ({'quick' if quick else 'full'}"
        f"{', the default without a GPU; --full for base sizes and whole sweeps' if quick and not gpu else ''}"
        f"{', the default on a GPU' if not quick and gpu else ''}): every kernel and model family checked, "
        f"ONNX exported and verified, then timed"
        f"{' briefly on the CPU (Triton timings need a GPU)' if not gpu else ''}. Writing to {folder}")

    def write(name: str) -> None:
        res = results[name]
        stem = f"{name}-{device_slug(env)}-{dtype}"
        report.write_results(res.rows, env, res.ceilings, folder, stem, res.title, res.notes)
        write_plot(name, res.rows, folder / f"{stem}.png")

    def write_index(state: str) -> None:
        lines = [f"# trifuse main job on {env['device']} ({dtype})", ""]
        lines += [f"- {line}" for line in headline(results, env, opts, state, time.perf_counter() - t0,
                                                    _cpu_seconds() - cpu0)]
        lines += ["", "## Environment", ""] + [f"- {k}: {v}" for k, v in env.items() if v is not None]
        if not gpu:
            lines += ["", f"**No GPU here.** {cpu_note(opts.device)} Every speed goal needs a GPU."]
        if missing:
            lines += ["", f"Not in this build: {', '.join(missing)}."]
        if took:
            lines += ["", "Wall (CPU) seconds per part: " + ", ".join(f"{k} {w:.0f} ({c:.0f})" for k, (w, c) in
                                                                      took.items()) + "."]
        lines += ["", "ONNX files were " + (f"kept in `{onnx_dir.name}/`." if keep_onnx else
                                            "deleted after verification (`--keep-onnx` keeps them).")]
        for name, res in results.items():
            stem = f"{name}-{device_slug(env)}-{dtype}"
            lines += ["", f"## {res.title}", ""]
            lines += [f"- note: {n}" for n in res.notes]
            lines += ["", report.markdown_table(res.rows, wide=wide) if res.rows else "(nothing ran)", ""]
            lines += [f"![{res.title}]({p.name})" for p in sorted(folder.glob(f"{stem}*.png"))]
            lines += ["", f"All columns: [{stem}.md]({stem}.md), rows: [json]({stem}.json), [csv]({stem}.csv)"]
        (folder / "report.md").write_text("\n".join(lines) + "\n")

    run_opts = dataclasses.replace(opts, quick=quick)
    part = ""
    with Progress(parts) as progress:
        run_opts = dataclasses.replace(run_opts, progress=progress.step)

        def whole_part(part: str, *names) -> None:
            """A part that is one suite's run: run, write its files, report, update the index."""
            progress.start(part)
            results[part] = _run_part(part, _suite(part).run, run_opts, *names)
            write(part)
            took[part] = progress.finish(summary(results[part].rows))
            report.print_table(results[part].rows, results[part].title, wide=wide)
            write_index(f"still running ({part} done)")

        try:
            for part in first:
                whole_part(part)
            for family, module, sizes in plan:
                part = family
                progress.start(family)
                names = list(sizes[:1] if quick else sizes)
                if quick and not gpu and family in quick_cpu:
                    names = [quick_cpu[family]]
                res = _run_part(family, _suite(module).run, run_opts, names)
                results[module] = _merge(results.get(module), res)
                write(module)
                progress.step("ONNX export and verification")
                exported = [_export_row(run_opts, module, n, onnx_dir, keep_onnx) for n in names[:1 if not gpu else 2]]
                if family != packed_after:
                    release_exports()  # the suites' cached exports (temporary files) are not needed again
                results["onnx"] = _merge(results.get("onnx"), SuiteResult(
                    "ONNX export, verified in ONNX Runtime against PyTorch", exported, {},
                    [] if gpu else ["Without a GPU only the small sizes are exported (the base ones take "
                                    "20-40 s each on 2 cores)."]))
                write("onnx")
                took[family] = progress.finish(summary(res.rows + exported))
                report.print_table(res.rows + exported, f"{family}: {res.title}", wide=wide)
                write_index(f"still running ({family} done)")
                if family == packed_after:  # the mixed-length batch, padded against padding-free (issue 27)
                    part = "packed"
                    # ... and a decoder's left-padded prompts (its prefill runs packed too)
                    whole_part(part, [names[-1] if gpu else names[0], "gpt2-tiny" if quick and not gpu else "gpt2"])
                    release_exports()
            for part in last:
                whole_part(part)
        except KeyboardInterrupt:
            write_index(f"interrupted during {part}")
            report.console.print(f"[bold red]Interrupted during {part}[/]; what finished is in {folder}")
            raise
    if not keep_onnx:
        shutil.rmtree(onnx_dir, ignore_errors=True)
    write_index("finished")
    lines = headline(results, env, opts, "finished", time.perf_counter() - t0, _cpu_seconds() - cpu0)
    report.console.rule("[bold]trifuse main job")
    for line in lines:
        report.console.print(line.replace("**", ""))
    failed = any(_passed(r) is False and _ours(r) for res in results.values() for r in res.rows)
    return folder, failed
