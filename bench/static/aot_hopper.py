"""trifuse's Triton kernels compiled for Hopper (sm_90) the way the JIT compiles them, without a GPU.

Run as a script with ``TRITON_INTERPRET`` unset, ``python bench/static/aot_hopper.py --dtypes fp16,bf16,fp32
--write bench/static`` regenerates the committed report (tests/test_compile_hopper.py runs it too).
A tool, not shipped: it lives beside the report it writes.

1. **Launches.** The engine's model families (BERT, ViT, GPT-2, T5 at their base
   widths, one layer) and the benchmark shapes (attention at head dim 128, split-K
   decode, norms and GELU at widths 768..32768) run on the CPU in fp16 and bf16
   with every kernel launch replaced by a recorder: the real launchers compute the
   real arguments (strided views of a fused QKV projection, KV-cache views, the T5
   lookup table, split-K buffers), nothing is computed.
2. **Binding.** Each launch is bound by Triton's own JIT binder
   (``triton.runtime.jit.create_function_from_signature`` and
   ``JITFunction._pack_args``) for a Hopper target, so the signature, the
   constexprs (integers equal to 1, such as unit strides) and the attributes
   (16-byte alignment of pointers, divisibility by 16 of integers) are those the
   JIT gives the kernel at that launch. An autotuned kernel is bound once for every
   config its shipped ``prune_configs_by`` keeps for that launch (the autotuner's
   own ``prune_configs``).
3. **Compiling.** ``triton.compile`` of each distinct specialization, in parallel
   processes; ptxas's own report (Triton's ``dump_ptxas_log``) gives registers,
   spills and stack; the kernel's metadata its shared memory; the PTX whether it
   uses ``wgmma`` and the bulk tensor copy (TMA); ``nvdisasm`` (from Triton's NVIDIA
   backend, ``triton.knobs.nvidia.nvdisasm``) the static SASS instruction count: every
   instruction line of the cubin's code sections, predicated ones included, the
   ``NOP`` padding (and any other ``NOP``) left out. Static: a loop body counts once,
   however often it runs.
4. **Peers.** A tutorial-06-style FlashAttention-2 forward of our own
   (bench/static/peer_flash.py: TMA descriptors, exp2 online softmax, causal in two sweeps, no
   masks or bias) as a baseline. The peer scenarios (``peer hd64``, ``peer hd128``) launch
   trifuse's attention at B=8, H=16, L=2048, plain and causal, and bind the peer at every
   (BLOCK_M, BLOCK_N, warps, stages) tile the shipped pruning keeps for those launches.
   Peer rows are marked and never shipped (they do not count towards the exit status);
   the report sets each next to trifuse's row for the same variant, dtype and tile.
   ``--no-peers`` leaves them out; ``--scenarios peer`` selects only them.

Prints one JSON line per compiled specialization. ``--write DIR`` also writes
``hopper-sm90.md`` and ``hopper-sm90.json`` there (bench/static/ holds the
committed copy). Exit status 1 when any specialization fails to compile, or when
a shipped autotune config spills or does not fit shared memory.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run with the interpreter off: the kernels must be JIT functions"

HERE = Path(__file__).resolve().parent  # bench/static: this tool and the peer kernel
REPO = HERE.parents[1]
for _path in (REPO, HERE):  # trifuse from this checkout; the peer by its bare name (workers re-import it)
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)
# H100 / H200 per SM: 64K 32-bit registers, 228 KB shared memory (227 KB for one block), 64 warps, 32 blocks.
SM_REGISTERS, SM_SHARED, BLOCK_SHARED_MAX, SM_WARPS, SM_BLOCKS = 65536, 228 * 1024, 227 * 1024, 64, 32
SHARED_RESERVED = 1024  # per block, taken by the driver
KERNEL_MODULES = ("attention", "norm", "gelu", "paged_attention", "varlen")
PEER_MODULE = "peer_flash"  # the tutorial-06-style baseline beside this file (not shipped)
PEER_SCENARIO = "peer "  # how the peer scenarios' names begin
PEER_SHAPE = (8, 16, 2048)  # B, H, L of the side-by-side
PEER_HEAD_DIMS = (64, 128)


def _module(name: str):
    if name == PEER_MODULE:
        return importlib.import_module(name)
    return importlib.import_module(f"trifuse.kernels.{name}")  # the module, not the op of the same name


# ----------------------------------------------------------------------------
# 1. Launches, recorded from the real launchers.


class Recorder:
    """Stands in for a launched kernel (``kernel[grid](*args, **kwargs)``): binds each launch
    the way the JIT would and keeps the distinct specializations; launches nothing."""

    def __init__(self, module: str, attr: str, kernel, scenario: list, found: dict, peer: bool = False):
        self.module, self.attr, self.kernel = module, attr, kernel
        self.scenario, self.found, self.peer = scenario, found, peer

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            for job in bind(self.module, self.attr, self.kernel, args, kwargs, peer=self.peer):
                entry = self.found.setdefault(job["key"], job)
                entry.setdefault("scenarios", [])
                if self.scenario[0] not in entry["scenarios"]:
                    entry["scenarios"].append(self.scenario[0])
        return launch


def _binder(fn, backend):
    from triton.runtime.jit import create_function_from_signature

    cached = getattr(fn, "_trifuse_aot_binder", None)
    if cached is None:
        cached = create_function_from_signature(fn.signature, fn.params, backend)
        fn._trifuse_aot_binder = cached
    return cached


def bind(module: str, attr: str, kernel, args: tuple, kwargs: dict, peer: bool = False) -> list[dict]:
    """The JIT's view of one launch: one compile job per config the autotuner would try.
    ``peer``: a baseline kernel launched with its tile as plain keywords (never shipped)."""
    from triton.compiler import make_backend
    from triton.runtime.autotuner import Autotuner

    backend = make_backend(HOPPER)
    if isinstance(kernel, Autotuner):
        fn = kernel.fn
        kernel.nargs = dict(zip(kernel.arg_names, args))
        try:
            configs = [(c, c.all_kwargs()) for c in kernel.prune_configs(dict(kwargs))]
        finally:
            kernel.nargs = None
    else:
        fn, configs = kernel, [(None, {})]
    jobs = []
    for config, extra in configs:
        kw = {**kwargs, **extra}
        # What JITFunction.run adds before binding (Triton 3.9; absent knobs are left out).
        kw["debug"] = kw.get("debug", fn.debug) or triton.knobs.runtime.debug
        for name in ("instrumentation_mode", "fpsan_homomorphic_casts"):
            if hasattr(triton.knobs.compilation, name):
                kw[name] = getattr(triton.knobs.compilation, name)
        bound, specialization, options = _binder(fn, backend)(*args, **kw)
        options, signature, constexprs, attrs = fn._pack_args(backend, kw, bound, specialization, options)
        dtypes = sorted({v for v in signature.values() if isinstance(v, str) and v.startswith("*")})
        consts = {fn.arg_names[p[0]]: v for p, v in constexprs.items() if len(p) == 1}
        if peer:  # its tile, as an autotune config would carry it
            config = None
            tile = {n: consts[n] for n in ("BLOCK_M", "BLOCK_N") if n in consts}
            tile.update(num_warps=options.num_warps, num_stages=options.num_stages)
        job = {
            "kernel": fn.__name__, "module": module, "attr": attr, "peer": peer,
            "signature": signature, "constexprs": [[list(p), _plain(v)] for p, v in constexprs.items()],
            "attrs": [[list(p), v] for p, v in attrs.items()], "options": dict(options.__dict__),
            "config": tile if peer else None if config is None else {
                **config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages},
            "shipped_config": config is not None,
            "dtype": _io_dtype(signature, dtypes),
            "flags": {k: _plain(v) for k, v in consts.items() if k.isupper()},
            "unit_args": sorted(k for k, v in consts.items() if not k.isupper() and v == 1),
            # integer arguments the JIT could not mark divisible by 16 (they tell specializations apart)
            "ints_not_div16": sorted(n for p, v in attrs.items() if not v
                                     for n in [fn.arg_names[p[0]]] if signature[n] in ("i32", "i64")),
        }
        job["key"] = json.dumps([job["kernel"], signature, job["constexprs"], job["attrs"], _plain(job["options"])],
                                sort_keys=True, default=str)
        jobs.append(job)
    return jobs


def _plain(v):
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    return str(v)


def _io_dtype(signature: dict, dtypes: list) -> str:
    first = next((v for v in signature.values() if isinstance(v, str) and v.startswith("*")), "*?")
    return first[1:]


def _unwrapped(kernel):
    return kernel.kernel if isinstance(kernel, Recorder) else kernel  # recording inside a recording


@contextlib.contextmanager
def recording(found: dict, scenario: list):
    """Every trifuse kernel launch inside the block is recorded (and not run); the ops take the
    Triton path on CPU tensors, as they would on CUDA tensors."""
    att, norm, gelu, paged, varlen = (_module(m) for m in KERNEL_MODULES)
    # Triton "runs" on CPU tensors here, so nothing takes the native CPU path (which would, e.g., hand
    # attention T5's bias densified and the engine's layers their CPU shapes).
    patches = [(_module("_dispatch"), "triton_runnable", lambda device: True),
               (att, "_kernel_takes", lambda q: q.dtype != torch.float64),
               (varlen, "_kernel_takes", lambda q: q.dtype != torch.float64),
               (norm, "use_triton", lambda t: True), (gelu, "use_triton", lambda t: True),
               (paged, "use_triton", lambda t: True)]
    for mod, name in ((att, "_attn_fwd_tuned"), (att, "_attn_combine"), (norm, "_norm_fwd"),
                      (norm, "_norm_fwd_looped"), (gelu, "_gelu_fwd"), (paged, "_paged_fwd_tuned"),
                      (paged, "_paged_merge"), (varlen, "_varlen_fwd_tuned")):
        patches.append((mod, name, Recorder(mod.__name__.rsplit(".", 1)[-1], name, _unwrapped(getattr(mod, name)),
                                            scenario, found)))
    peer = _module(PEER_MODULE)
    patches.append((peer, "_peer_fwd", Recorder(PEER_MODULE, "_peer_fwd", _unwrapped(peer._peer_fwd), scenario,
                                                found, peer=True)))
    saved = [(mod, name, getattr(mod, name)) for mod, name, _ in patches]
    try:
        for mod, name, value in patches:
            setattr(mod, name, value)
        yield
    finally:
        for mod, name, value in saved:
            setattr(mod, name, value)


def _hf(size: str, auto_class: str):
    """A one-layer Hugging Face model at a named size's widths, random weights (no hub)."""
    import transformers

    from trifuse.engine.registry import families

    cfg = dict(next(f.named_sizes[size] for f in families() if size in f.named_sizes))
    config = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    for depth in ("num_hidden_layers", "n_layer", "num_layers", "num_decoder_layers"):
        if hasattr(config, depth):
            setattr(config, depth, 1)
    torch.manual_seed(0)
    return getattr(transformers, auto_class).from_config(config)


def engine_scenarios(dtype: torch.dtype):
    """(name, zero-argument callable) pairs: what the engine launches at the device check's shapes."""
    from trifuse import engine, kernels

    def model(size, auto_class, task):
        return engine.from_pretrained(_hf(size, auto_class), task=task, dtype=dtype, device="cpu")

    def bert():
        m = model("bert-base", "AutoModel", "feature-extraction")
        ids = torch.randint(3, 1000, (2, 128))
        mask = torch.ones_like(ids)
        # Padded, but over 90% real: the padded kernel with its mask (engine.packing packs below that;
        # the packed launches are the varlen scenario's). An all-ones mask would be passed on as None.
        mask[1, 120:] = 0
        m(input_ids=ids, attention_mask=mask)

    def vit():
        vit = model("vit-base-patch16-224", "AutoModel", "feature-extraction")
        vit(pixel_values=torch.randn(2, 3, 224, 224, dtype=dtype))

    def gpt2():
        m = model("gpt2", "AutoModelForCausalLM", "causal-lm")
        ids = torch.randint(0, 50000, (1, 512))
        m.generate(ids, torch.ones_like(ids), max_new_tokens=3, eos_token_id=[], pad_token_id=0)

    def t5():
        m = model("t5-base", "AutoModelForSeq2SeqLM", "text2text-generation")
        ids = torch.randint(2, 30000, (1, 128))
        m.generate(ids, torch.ones_like(ids), max_new_tokens=3, eos_token_id=[], pad_token_id=0)

    def t5_padded():
        # A padded batch: the encoder's self-attention takes the mask and the T5 bias together.
        m = model("t5-base", "AutoModelForSeq2SeqLM", "text2text-generation")
        ids = torch.randint(2, 30000, (2, 96))
        mask = torch.ones_like(ids)
        mask[1, 90:] = 0  # over 90% real: padded, not packed (engine.packing)
        m.encode(ids, mask)

    def t5_graph_step():
        # engine.graphs' static T5 decoding passes the decoder's self-attention bias dense,
        # [1, H, 1, Lk] (T5 Decoder.rel with a device-tensor start), over the cache's views.
        H, D, cap = 12, 64, 64
        q = torch.randn(1, 1, H, D, dtype=dtype).transpose(1, 2)
        cache = torch.randn(1, H, cap, D, dtype=dtype)
        bias = torch.randn(H, cap)[None, :, None, :]
        kernels.attention(q, cache, cache, causal=True, bias=bias.to(dtype), scale=1.0)

    return [("bert-base B2 S128 (mask)", bert), ("vit-base B2", vit), ("gpt2 prefill 512 + decode", gpt2),
            ("t5-base encode 128 + decode", t5), ("t5-base encode B2 S96 padded (mask + T5)", t5_padded),
            ("t5 graph decode step (dense bias)", t5_graph_step)]


def bench_scenarios(dtype: torch.dtype):
    """The kernel benchmarks' shapes: attention at head dim 128, split-K decode, norms and GELU."""
    from trifuse import kernels

    def attention_hd128():
        B, H, L, D = 8, 16, 2048, 128
        q, k, v = (torch.randn(B, H, L, D, dtype=dtype) for _ in range(3))
        rel = kernels.RelativeBias(torch.randn(32, H, dtype=dtype), True)
        kernels.attention(q, k, v)
        kernels.attention(q, k, v, causal=True)
        kernels.attention(q, k, v, relative_bias=rel, scale=1.0)
        rel_c = kernels.RelativeBias(rel.table, False)
        kernels.attention(q, k, v, causal=True, relative_bias=rel_c, scale=1.0)

    def decode_hd128():
        q = torch.randn(1, 32, 1, 128, dtype=dtype)
        k, v = (torch.randn(1, 32, 8192, 128, dtype=dtype) for _ in range(2))
        kernels.attention(q, k, v, causal=True)

    def norms():
        for width in (768, 4096, 8192, 16384, 32768):
            x, r = (torch.randn(16, width, dtype=dtype) for _ in range(2))
            w, b = torch.randn(width, dtype=dtype), torch.randn(width, dtype=dtype)
            kernels.layer_norm(x, w, b, residual=r)
            kernels.rms_norm(x, w, residual=r)
            if width <= 8192:
                kernels.gelu(x, b)
                kernels.gelu(x, b, approximate="tanh")
                kernels.gelu(x, gate=r)

    def paged_steps():
        # Continuous batching's step (engine.continuous): 64 decode tokens and a prefill chunk over a
        # block pool, at GPT-2's, T5's (with its bias; cross-attention without) and a hd128 width; and
        # one long sequence, whose keys split across programs.
        for heads, d in ((12, 64), (8, 64), (32, 128)):
            pool = torch.randn(2, 512, 16, heads, d, dtype=dtype)
            tables = torch.arange(512, dtype=torch.int32).view(64, 8)
            seq = torch.cat([torch.arange(64), torch.full((40,), 3)]).to(torch.int32)
            lens = torch.cat([torch.randint(1, 128, (64,)), torch.arange(1, 41)]).to(torch.int32)
            q = torch.randn(104, heads, d, dtype=dtype)
            kernels.paged_attention(q, pool[0], pool[1], tables, seq, lens)
            rel = kernels.RelativeBias(torch.randn(32, heads, dtype=dtype), False)
            kernels.paged_attention(q, pool[0], pool[1], tables, seq, lens, relative_bias=rel, scale=1.0)
            long_table = torch.arange(512, dtype=torch.int32)[None]
            one = torch.tensor([0], dtype=torch.int32)
            kernels.paged_attention(q[:1], pool[0], pool[1], long_table, one, torch.tensor([8000], dtype=torch.int32))
            kernels.paged_attention(q[:1], pool[0], pool[1], long_table, one, torch.tensor([8000], dtype=torch.int32),
                                    relative_bias=rel, scale=1.0)

    def varlen():
        # bench/packed.py's batch: 32 sentences, log-normal lengths (median 24, at most 256), packed;
        # q/k/v as views of a fused QKV projection (the engine's layout), at head dims 64 and 128.
        from trifuse.bench.packed import WORKLOAD, lengths as draw

        g = torch.Generator().manual_seed(0)
        lengths = torch.tensor(draw(**WORKLOAD), dtype=torch.int32)
        cu = torch.cat([torch.zeros(1, dtype=torch.int32), lengths.cumsum(0).int()])
        L = int(lengths.max())
        for H, D in ((12, 64), (16, 128)):
            q, k, v = torch.empty(int(cu[-1]), 3, H, D, dtype=dtype).unbind(1)
            rel = kernels.RelativeBias(torch.randn(32, H, generator=g).to(dtype), True)
            kernels.attention_varlen(q, k, v, cu, cu, L, L)
            kernels.attention_varlen(q, k, v, cu, cu, L, L, causal=True)
            kernels.attention_varlen(q, k, v, cu, cu, L, L, relative_bias=rel, scale=1.0)
            rel_c = kernels.RelativeBias(rel.table, False)
            kernels.attention_varlen(q, k, v, cu, cu, L, L, causal=True, relative_bias=rel_c, scale=1.0)

    return [("attention hd128 L2048 (plain, causal, T5, T5 causal)", attention_hd128),
            ("paged attention: engine steps hd64/hd128, T5 bias, split", paged_steps),
            ("varlen B32 log-normal lengths, hd64 and hd128 (plain, causal, T5, T5 causal)", varlen),
            ("split-K decode hd128 Lk8192", decode_hd128), ("norms and GELU, widths 768..32768", norms)]


def _kept_tiles(launch) -> list[tuple]:
    """(BLOCK_M, BLOCK_N, warps, stages) of every config the shipped pruning keeps for the attention
    launches ``launch()`` makes (recorded on the side: nothing of it reaches the report)."""
    seen: dict = {}
    with recording(seen, ["(tiles)"]):
        launch()
    return sorted({(c["BLOCK_M"], c["BLOCK_N"], c["num_warps"], c["num_stages"])
                   for j in seen.values() if j["kernel"] == "_attn_fwd" for c in [j["config"]]}, reverse=True)


def peer_scenarios(dtype: torch.dtype):
    """trifuse's attention and the tutorial-06-style peer (bench/static/peer_flash.py) at one shape, plain
    and causal: the peer at each tile trifuse's autotuner would try there."""
    from trifuse import kernels

    peer = _module(PEER_MODULE)
    B, H, L = PEER_SHAPE

    def side_by_side(D):
        q, k, v = (torch.empty(B, H, L, D, dtype=dtype) for _ in range(3))  # never read: nothing runs
        for causal in (False, True):
            tiles = _kept_tiles(lambda: kernels.attention(q, k, v, causal=causal))
            kernels.attention(q, k, v, causal=causal)
            for bm, bn, warps, stages in tiles:
                peer.peer_attention(q, k, v, causal, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)

    return [(f"{PEER_SCENARIO}hd{D} B{B} H{H} L{L}: trifuse and the tutorial-06-style peer (plain, causal)",
             lambda D=D: side_by_side(D)) for D in PEER_HEAD_DIMS]


def record(dtypes=("fp16", "bf16"), scenarios: str | None = None, unpruned: bool = False,
           peers: bool = True) -> dict:
    """Every distinct specialization the scenarios launch (``scenarios``: a regex on their names).
    ``unpruned``: bind the attention configs the Hopper pruning drops too (marked not shipped).
    ``peers``: the peer scenarios too."""
    found: dict = {}
    names = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    tri = _module("_attention_triton")  # the configs and their Hopper pruning
    dropped: dict = {}  # bound only with the pruning off
    for dt in dtypes:
        dtype = names[dt]
        for name, fn in engine_scenarios(dtype) + bench_scenarios(dtype) + (peer_scenarios(dtype) if peers else []):
            if scenarios and not re.search(scenarios, name):
                continue
            scenario = [f"{name} [{dt}]"]
            with recording(found, scenario), torch.no_grad():
                fn()
            if unpruned:
                fits = tri.hopper_fits
                tri.hopper_fits = lambda *a, **k: True
                try:
                    with recording(dropped, scenario), torch.no_grad():
                        fn()
                finally:
                    tri.hopper_fits = fits
    for key, job in dropped.items():
        if key not in found:
            found[key] = {**job, "shipped_config": False}
    return found


# ----------------------------------------------------------------------------
# 2-3. Compiling, and what ptxas made of it.

_PTXAS_RE = {
    "registers": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "stack_bytes": re.compile(r"(\d+) bytes stack frame"),
}


def _worker_init():
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"  # ptxas must run (its report is what we read), cache or not
    triton.knobs.compilation.always_compile = True
    triton.knobs.nvidia.dump_ptxas_log = True


def compile_job(job: dict) -> dict:
    from triton.compiler import ASTSource
    from triton.runtime.autotuner import Autotuner

    fn = getattr(_module(job["module"]), job["attr"])
    if isinstance(fn, Autotuner):
        fn = fn.fn  # the JITFunction it tunes
    constexprs = {tuple(p): v for p, v in job["constexprs"]}
    attrs = {tuple(p): v for p, v in job["attrs"]}
    row = {k: job[k] for k in ("kernel", "dtype", "config", "shipped_config", "flags", "unit_args",
                               "ints_not_div16", "scenarios")}
    row["peer"] = job.get("peer", False)
    t0 = time.perf_counter()
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            k = triton.compile(ASTSource(fn, job["signature"], constexprs, attrs), target=HOPPER,
                               options=job["options"])
    except Exception as e:  # noqa: BLE001 - every failure is reported
        row.update(ok=False, error=f"{type(e).__name__}: {str(e)[-1500:]}")
        return row
    text = log.getvalue()
    for name, rx in _PTXAS_RE.items():
        m = rx.search(text)
        row[name] = int(m.group(1)) if m else None
    ptx = k.asm.get("ptx", "")
    warps = job["options"].get("num_warps", 4)
    row.update(ok=True, seconds=round(time.perf_counter() - t0, 2), shared_bytes=int(k.metadata.shared),
               num_warps=warps, num_stages=job["options"].get("num_stages"),
               cubin_bytes=len(k.asm.get("cubin", b"")), wgmma=ptx.count("wgmma.mma_async"),
               mma_sync=ptx.count("mma.sync"), tma=ptx.count("cp.async.bulk.tensor"),
               cp_async=len(re.findall(r"cp\.async\.c[ag]\.", ptx)),
               sass_instructions=sass_instructions(k.asm.get("cubin", b"")))
    row.update(occupancy(row["registers"], row["shared_bytes"], warps))
    return row


_SASS_LINE = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)", re.M)


def sass_instructions(cubin: bytes) -> int | None:
    """Static SASS instruction count of a cubin: the instruction lines ``nvdisasm -c`` prints for
    its code sections (``/*addr*/ [@pred] OPCODE ... ;``), NOPs (the alignment padding) left out.
    None when nvdisasm is missing or fails (the count is informative, not a check)."""
    import subprocess
    import tempfile

    try:
        tool = triton.knobs.nvidia.nvdisasm.path
    except Exception:  # noqa: BLE001 - an older or newer Triton without the knob
        return None
    if not cubin or not tool:
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        try:
            text = subprocess.run([tool, "-c", f.name], capture_output=True, text=True, check=True,
                                  timeout=120).stdout
        except (OSError, subprocess.SubprocessError):
            return None
    return sum(1 for op in _SASS_LINE.findall(text) if op != "NOP")


def occupancy(registers, shared: int, warps: int) -> dict:
    """Resident blocks per SM on an H100/H200, and whether a block fits at all."""
    fits = shared <= BLOCK_SHARED_MAX
    limits = {"warps": SM_WARPS // warps, "blocks": SM_BLOCKS}
    if registers:
        per_warp = -(-registers * 32 // 256) * 256  # allocated per warp in units of 256
        limits["registers"] = (SM_REGISTERS // per_warp) // warps
    limits["shared"] = SM_SHARED // (shared + SHARED_RESERVED)
    blocks = min(limits.values()) if fits else 0
    return {"fits_shared": fits, "blocks_per_sm": blocks, "warps_per_sm": blocks * warps,
            "occupancy_limit": min(limits, key=limits.get) if fits else "shared"}


def problems(row: dict) -> list[str]:
    """Why a compiled specialization is not acceptable for a shipped config (empty: fine)."""
    if not row["ok"]:
        return ["does not compile"]
    out = []
    if row["spill_stores"] or row["spill_loads"]:
        out.append(f"spills {row['spill_stores']} B stores / {row['spill_loads']} B loads")
    if not row["fits_shared"]:
        out.append(f"needs {row['shared_bytes'] // 1024} KB shared memory (> {BLOCK_SHARED_MAX // 1024} KB)")
    return out


def shipped_problems(row: dict) -> list[str]:
    """The exit-status rule: what is wrong with a shipped autotune config (peers are never shipped)."""
    return problems(row) if row.get("shipped_config") and not row.get("peer") else []


def compile_all(jobs: list[dict], workers: int) -> list[dict]:
    def progress(results):
        out = []
        for i, r in enumerate(results, 1):
            out.append(r)
            print(f"# [{i}/{len(jobs)}] {r['kernel']} {_variant(r)} {r['dtype']} {_cfg(r)}: "
                  f"{r.get('registers')} regs, {r.get('seconds')} s", file=sys.stderr, flush=True)
        return out

    if workers <= 1:
        _worker_init()
        return progress(compile_job(j) for j in jobs)
    import multiprocessing

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_worker_init) as pool:
        return progress(pool.map(compile_job, jobs, chunksize=1))


# ----------------------------------------------------------------------------
# The table.


def _variant(row: dict) -> str:
    f = row["flags"]
    if row["kernel"] == "_attn_fwd":
        parts = [n for n, on in (("causal", f.get("CAUSAL")), ("mask", f.get("HAS_MASK")), ("bias", f.get("HAS_BIAS")),
                                 ("T5", f.get("HAS_REL")), ("split", f.get("SPLIT"))) if on] or ["plain"]
        if "Lq" in row["unit_args"]:
            parts.append("Lq=1")
        return "+".join(parts) + f" hd{f.get('BLOCK_D')}"
    if row["kernel"] == "_paged_fwd":
        parts = [n for n, on in (("T5", f.get("HAS_REL")), ("split", f.get("SPLIT"))) if on] or ["plain"]
        return "+".join(parts) + f" hd{f.get('BLOCK_D')} bs{f.get('BLOCK_SIZE')}"
    if row["kernel"] in ("_attn_combine", "_paged_merge"):
        return f"S{f.get('BLOCK_S')} D{f.get('BLOCK_D')}"
    if row["kernel"] == "_peer_fwd":
        return ("causal" if f.get("CAUSAL") else "plain") + f" hd{f.get('HEAD_DIM')}"
    return " ".join(f"{k}={v}" for k, v in f.items() if k.startswith(("IS_", "HAS_", "TANH", "BLOCK")))


def _label(row: dict) -> str:
    """What --match is matched against: 'kernel variant dtype config'."""
    return f"{row['kernel']} {_variant(row)} {row['dtype']} {_cfg(row)}"


def _cfg(row: dict) -> str:
    c = row.get("config")
    if not c:
        return f"{row.get('num_warps')}w"
    tile = f"{c.get('BLOCK_M')}x{c.get('BLOCK_N')}" if "BLOCK_M" in c else f"N{c.get('BLOCK_N')}"
    return f"{tile} {c['num_warps']}w {c['num_stages']}s"


def _n(v, fmt="{}") -> str:
    return "-" if v is None else fmt.format(v)


def markdown(rows: list[dict], meta: dict) -> str:
    bad = [r for r in rows if shipped_problems(r)]
    peers = sum(1 for r in rows if r.get("peer"))
    md = ["# Static Hopper (sm_90) report, faithful to the JIT", "",
          f"Generated by `python bench/static/aot_hopper.py --dtypes {meta['dtypes']}"
          f"{'' if meta.get('peers', True) else ' --no-peers'} --write bench/static` with Triton "
          f"{meta['triton']} "
          f"(ptxas from its NVIDIA backend), torch {meta['torch']}, {meta['date']}. No GPU involved: every "
          "launch the engine and the benchmarks make at the device check's shapes was recorded on the CPU "
          "and bound by Triton's own JIT binder for sm_90 (unit strides as constexprs, 16-byte alignment and "
          "divisibility by 16 as the JIT sees them), once per autotune config the shipped pruning keeps."
          + (f" {meta['note']}" if meta.get("note") else ""), "",
          f"{len(rows)} specializations compiled in {meta['seconds']:.0f} s; "
          f"{sum(1 for r in rows if r.get('shipped_config'))} of them shipped autotune configs"
          + (f", {peers} a tutorial-06-style peer kernel's (marked *peer*, not shipped; see the last section). "
             if peers else ". ")
          + (f"**{len(bad)} shipped configs spill or do not fit.**" if bad else
             "No shipped config spills or overflows shared memory."), "",
          "Occupancy is resident blocks per SM from registers (64K per SM, allocated per warp in 256s), "
          "shared memory (228 KB per SM, 1 KB reserved per block), warps (64) and blocks (32); `wgmma` "
          "counts `wgmma.mma_async` in the PTX (Hopper tensor cores), `cp.async` the Ampere-style async "
          "copies, `TMA` the bulk tensor copies; `SASS` the instructions `nvdisasm` lists for the cubin "
          "(static: a loop body counts once; NOPs left out).", "",
          "| kernel | variant | dtype | config | regs | spill st/ld B | stack B | shared KB | blocks/SM (limit) "
          "| wgmma | cp.async | TMA | SASS | ints not /16 | launched by |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    order = sorted(rows, key=lambda r: (r["kernel"], _variant(r), r["dtype"], _cfg(r)))
    for r in order:
        peer = " *peer*" if r.get("peer") else ""
        if not r["ok"]:
            md.append(f"| {r['kernel']} | {_variant(r)} | {r['dtype']} | {_cfg(r)}{peer} | compile error "
                      f"| | | | | | | | | | {'; '.join(r['scenarios'])[:120]} |")
            continue
        flag = " **!**" if shipped_problems(r) else ""
        md.append(f"| {r['kernel']} | {_variant(r)} | {r['dtype']} | {_cfg(r)}{flag}{peer} | {r['registers']} | "
                  f"{r['spill_stores']}/{r['spill_loads']} | {r['stack_bytes']} | {r['shared_bytes'] / 1024:.0f} | "
                  f"{r['blocks_per_sm']} ({r['occupancy_limit']}) | {r['wgmma']} | {r['cp_async']} | {r['tma']} | "
                  f"{_n(r.get('sass_instructions'))} | {', '.join(r.get('ints_not_div16', [])) or '-'} | "
                  f"{'; '.join(r['scenarios'])[:120]} |")
    md += side_by_side(rows)
    return "\n".join(md) + "\n"


def _pairs(rows: list[dict]) -> list[tuple[dict, dict]]:
    """(trifuse row, peer row) for each variant, dtype and tile both were compiled at in the peer
    scenarios. trifuse's rows come from the peer scenarios' own launches (the same shape)."""
    ours = {}
    for r in rows:
        if (r["kernel"] == "_attn_fwd" and not r.get("peer")
                and any(s.startswith(PEER_SCENARIO) for s in r.get("scenarios", []))):
            ours.setdefault((_variant(r), r["dtype"], _cfg(r)), r)
    out = []
    for p in rows:
        if p.get("peer") and (_variant(p), p["dtype"], _cfg(p)) in ours:
            out.append((ours[(_variant(p), p["dtype"], _cfg(p))], p))
    hd = lambda r: int(_variant(r).rsplit("hd", 1)[1])  # noqa: E731
    out.sort(key=lambda t: (hd(t[1]), _variant(t[1]).startswith("causal"), t[1]["dtype"] != "fp16", t[1]["dtype"],
                            -t[1]["config"]["BLOCK_M"], -t[1]["config"]["BLOCK_N"], -t[1]["config"]["num_warps"]))
    return out


def _spilled(row: dict):
    st, ld = row.get("spill_stores"), row.get("spill_loads")
    return None if st is None and ld is None else (st or 0) + (ld or 0)


def side_by_side(rows: list[dict]) -> list[str]:
    """The markdown section setting trifuse's attention next to the peer's (empty without peers)."""
    pairs = _pairs(rows)
    if not pairs:
        return []
    B, H, L = PEER_SHAPE
    md = ["", "## Side by side with a tutorial-06-style kernel", "",
          "trifuse's `_attn_fwd` (its mask, bias, T5 and split-K flags off; even plain, it keeps a masked "
          "loop for a ragged end of the keys) and `_peer_fwd` (bench/static/peer_flash.py), our own minimal "
          "FlashAttention-2 forward in the structure of Triton's tutorial 06: Q, K, V and O through TMA "
          "descriptors, exp2 online softmax, causal in two sweeps (blocks below the diagonal unmasked, then "
          "the diagonal masked); no padding mask, bias, ragged lengths or split-K. "
          f"Both bound at B={B}, H={H}, L={L} at each tile trifuse's shipped pruning keeps there. Each cell "
          "is *trifuse / peer*; the ratios are trifuse's over the peer's. The peer is a baseline, never shipped.",
          "", "| variant | dtype | tile | regs | spill B (st+ld) | shared KB | blocks/SM | SASS | wgmma | cp.async "
          "| TMA | regs ratio | SASS ratio |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def both(a, b, fmt="{}"):
        return f"{_n(a, fmt)} / {_n(b, fmt)}"

    def ratio(a, b):
        return f"{a / b:.2f}" if a and b else "-"

    for t, p in pairs:
        tile = _cfg(p) + ("" if t.get("shipped_config") else " (not shipped)")
        if not (t["ok"] and p["ok"]):
            which = " and ".join(n for n, r in (("trifuse", t), ("peer", p)) if not r["ok"])
            md.append(f"| {_variant(p)} | {p['dtype']} | {tile} | {which}: compile error | | | | | | | | | |")
            continue
        kb = (t["shared_bytes"] / 1024, p["shared_bytes"] / 1024)
        md.append(f"| {_variant(p)} | {p['dtype']} | {tile} | {both(t['registers'], p['registers'])} | "
                  f"{both(_spilled(t), _spilled(p))} | "
                  f"{both(*kb, '{:.0f}')} | {both(t['blocks_per_sm'], p['blocks_per_sm'])} | "
                  f"{both(t.get('sass_instructions'), p.get('sass_instructions'))} | {both(t['wgmma'], p['wgmma'])} | "
                  f"{both(t['cp_async'], p['cp_async'])} | {both(t['tma'], p['tma'])} | "
                  f"{ratio(t['registers'], p['registers'])} | "
                  f"{ratio(t.get('sass_instructions'), p.get('sass_instructions'))} |")
    return md


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtypes", default="fp16,bf16", help="comma-separated: fp16, bf16, fp32 (default fp16,bf16)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel compiles (default: CPUs)")
    p.add_argument("--write", type=Path, metavar="DIR", help="write hopper-sm90.md / .json into DIR")
    p.add_argument("--limit", type=int, help="compile only the first N specializations (a quick look)")
    p.add_argument("--scenarios", metavar="REGEX",
                   help="record only the scenarios whose name matches (e.g. 't5|hd128'; default: all)")
    p.add_argument("--match", metavar="REGEX",
                   help="compile only specializations whose 'kernel variant dtype config' label matches, "
                        "e.g. '_attn_fwd .*T5' (iterating on one kernel path)")
    p.add_argument("--list", action="store_true", help="print the selected specializations' labels, compile nothing")
    p.add_argument("--unpruned", action="store_true",
                   help="also bind the attention configs the Hopper pruning (hopper_fits) drops, to see "
                        "which of them would spill now (they are reported, not shipped)")
    p.add_argument("--peers", action=argparse.BooleanOptionalAction, default=True,
                   help="the peer scenarios: trifuse's attention and the tutorial-06-style peer kernel "
                        "(bench/static/peer_flash.py) at B8 H16 L2048, hd64 and hd128, side by side in the report "
                        "(default: on; --no-peers leaves them out, --scenarios peer selects only them)")
    p.add_argument("--render", type=Path, metavar="JSON", help="only rewrite the markdown beside a written JSON")
    args = p.parse_args(argv)
    if args.render:
        doc = json.loads(args.render.read_text())
        args.render.with_suffix(".md").write_text(markdown(doc["rows"], doc["meta"]))
        return 0
    t0 = time.perf_counter()
    found = record(tuple(d.strip() for d in args.dtypes.split(",") if d.strip()), args.scenarios, args.unpruned,
                   args.peers)
    t_rec = time.perf_counter() - t0
    jobs = list(found.values())
    if args.match:
        jobs = [j for j in jobs if re.search(args.match, _label(j))]
    jobs = jobs[: args.limit]
    if args.list:
        for j in jobs:
            print(_label(j), "(shipped)" if j["shipped_config"] else "(peer)" if j.get("peer") else "")
        return 0
    print(f"# {len(jobs)} distinct specializations recorded in {t_rec:.0f} s; compiling with {args.workers} "
          "workers", file=sys.stderr, flush=True)
    rows = compile_all(jobs, args.workers)
    for r in rows:
        print(json.dumps(r), flush=True)
    meta = {"triton": triton.__version__, "torch": torch.__version__, "seconds": time.perf_counter() - t0,
            "date": time.strftime("%Y-%m-%d"), "dtypes": args.dtypes, "peers": args.peers}
    if args.write:
        args.write.mkdir(parents=True, exist_ok=True)
        (args.write / "hopper-sm90.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        (args.write / "hopper-sm90.md").write_text(markdown(rows, meta))
    failed = [r for r in rows if not r["ok"]]
    bad = [r for r in rows if shipped_problems(r)]
    for r in bad:
        print(f"# shipped config {r['kernel']} {_variant(r)} {r['dtype']} {_cfg(r)}: {'; '.join(problems(r))}",
              file=sys.stderr)
    for r in rows:  # a baseline's spills are news, not a failure
        if r.get("peer") and r["ok"] and problems(r):
            print(f"# peer {_label(r)}: {'; '.join(problems(r))} (not shipped)", file=sys.stderr)
    return 1 if failed or bad else 0


if __name__ == "__main__":
    sys.exit(main())
