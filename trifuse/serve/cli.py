"""``trifuse serve CHECKPOINT --task TASK``: start Ray (local, on loopback), serve, wait, shut down."""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import sys
import threading
from pathlib import Path

from trifuse.engine.cliargs import non_negative_float, port, positive_int
from trifuse.engine.extras import require

from .requests import Limits


def add_arguments(p) -> None:
    p.add_argument("checkpoint", help="checkpoint directory (config.json, weights, tokenizer files)")
    p.add_argument("--task", required=True, help="pipeline task, e.g. text-classification, fill-mask, "
                   "feature-extraction, sentence-embedding, question-answering, text-generation")
    p.add_argument("--host", default="127.0.0.1", metavar="ADDR", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=port, default=8000, metavar="N", help="HTTP port (default 8000)")
    p.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the model's id in /v1/models and OpenAI requests (default: the checkpoint's name)")
    p.add_argument("--replicas", type=positive_int, default=1, metavar="N", help="replicas of the model (default 1)")
    p.add_argument("--gpus-per-replica", type=non_negative_float, default=None, metavar="F",
                   help="GPUs Ray reserves per replica (default: 1 with --device cuda, else 0)")
    p.add_argument("--cpus-per-replica", type=non_negative_float, default=1.0, metavar="F",
                   help="CPUs Ray reserves per replica (default 1)")
    p.add_argument("--max-batch-size", type=positive_int, default=32, metavar="N",
                   help="requests per batch (default 32)")
    p.add_argument("--batch-wait-ms", type=non_negative_float, default=5.0, metavar="MS",
                   help="how long a batch waits to fill, in ms (default 5)")
    p.add_argument("--continuous-batching", action=argparse.BooleanOptionalAction, default=True,
                   help="generation tasks: run every request, streamed or not, on trifuse.GenerationEngine "
                   "(in-flight batching over a paged KV cache; --max-batch-size is its max_num_seqs) where the "
                   "model can run in one (default); --no-continuous-batching: @serve.batch batches and "
                   "step-wise streams")
    p.add_argument("--max-batch-tokens", type=positive_int, default=None, metavar="N",
                   help="encoder tasks: a batch's inputs run in groups of at most N real tokens, packed "
                   "(default 16384, as text-embeddings-inference); generation on the engine: tokens per step "
                   "(default 512)")
    p.add_argument("--kv-cache-mib", type=positive_int, default=None, metavar="MIB",
                   help="with the engine: the KV pool's size (default: max_num_seqs x 1024 tokens, at most 1 GiB)")
    p.add_argument("--max-concurrent-requests", type=positive_int, default=512, metavar="N",
                   help="requests in flight per replica; past it a request is answered 429 (default 512)")
    p.add_argument("--request-timeout-s", type=non_negative_float, default=300.0, metavar="S",
                   help="a request running longer is answered 504 and its work stopped (default 300)")
    d = Limits()
    p.add_argument("--max-new-tokens", type=positive_int, default=d.max_new_tokens, metavar="N",
                   help=f"largest max_new_tokens / min_new_tokens / max_tokens a request may ask for "
                   f"(default {d.max_new_tokens})")
    p.add_argument("--max-num-beams", type=positive_int, default=d.max_num_beams, metavar="N",
                   help=f"largest num_beams (default {d.max_num_beams})")
    p.add_argument("--max-return-sequences", type=positive_int, default=d.max_return_sequences, metavar="N",
                   help=f"largest num_return_sequences / n (default {d.max_return_sequences})")
    p.add_argument("--max-inputs-per-request", type=positive_int, default=d.max_inputs, metavar="N",
                   help=f"inputs (texts, prompts, images) per request (default {d.max_inputs})")
    p.add_argument("--max-image-pixels", type=positive_int, default=d.max_image_pixels, metavar="N",
                   help=f"width x height of one image (default {d.max_image_pixels})")
    p.add_argument("--max-body-bytes", type=positive_int, default=d.max_body_bytes, metavar="N",
                   help=f"request body size; larger is answered 413 (default {d.max_body_bytes})")
    p.add_argument("--allow-image-dir", default=None, metavar="DIR",
                   help="let image requests name files inside DIR (default: none; images come as base64)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: the pipeline's)")
    p.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default: the checkpoint's)")
    p.add_argument("--quantize", choices=["int8"], default=None, help="int8 linears (CPU only; docs/cpu.md)")
    p.add_argument("--address", default=None, metavar="RAY_ADDRESS",
                   help="an existing Ray cluster (default: start a local Ray, listening on 127.0.0.1 only)")
    p.add_argument("--access-log", action="store_true", help="log every request (Ray Serve's access log)")
    p.set_defaults(func=main)


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def start_local_ray(host: str) -> None:
    """A local Ray whose processes (GCS, raylet, workers, agents, metrics) listen on loopback only
    while ``host`` is a loopback address: Ray's single-machine mode, which binds everything to
    127.0.0.1 (set before Ray is imported, since Ray reads it then). Ray's dashboard stays off."""
    if _loopback(host):
        if "ray" in sys.modules and os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") != "0":
            raise RuntimeError("trifuse serve must start the local Ray before anything imports ray")
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # ray_constants.ENABLE_RAY_CLUSTER = False
    import ray

    ray.init(include_dashboard=False, dashboard_host="127.0.0.1" if _loopback(host) else host,
             logging_level="ERROR", configure_logging=True)


def _engine_options(args):
    """``deployment``'s ``engine=``: off, on where the model can (default), or insisted on with a pool size."""
    if not args.continuous_batching:
        return False
    if not args.kv_cache_mib:
        return True
    return {"max_num_seqs": args.max_batch_size, "kv_cache_bytes": args.kv_cache_mib << 20}


def main(args) -> int:
    """Start Ray (local, or ``--address``), serve the app, wait for Ctrl-C / SIGTERM, shut down."""
    require("trifuse serve", "serve", "ray", "starlette", "prometheus_client")
    if not (Path(args.checkpoint) / "config.json").is_file():
        print(f"trifuse serve: error: {args.checkpoint}: no config.json (not a checkpoint directory)",
              file=sys.stderr)
        return 2
    if not args.request_timeout_s > 0:
        print("trifuse serve: error: --request-timeout-s must be > 0", file=sys.stderr)
        return 2
    if args.kv_cache_mib and not args.continuous_batching:
        print("trifuse serve: error: --kv-cache-mib sizes the generation engine's KV pool; it does not go with "
              "--no-continuous-batching", file=sys.stderr)
        return 2
    generation = args.task in ("text-generation", "text2text-generation", "summarization") or (
        args.task.startswith("translation"))
    if args.max_batch_tokens and not args.continuous_batching and generation:
        print("trifuse serve: error: --max-batch-tokens is for encoder tasks and the generation engine; it does not "
              "go with --no-continuous-batching", file=sys.stderr)
        return 2
    limits = Limits(max_inputs=args.max_inputs_per_request, max_new_tokens=args.max_new_tokens,
                    max_num_beams=args.max_num_beams, max_return_sequences=args.max_return_sequences,
                    max_image_pixels=args.max_image_pixels, max_body_bytes=args.max_body_bytes,
                    image_dir=os.path.abspath(args.allow_image_dir) if args.allow_image_dir else None)
    if args.address:
        import ray

        ray.init(address=args.address, logging_level="ERROR")
    else:
        start_local_ray(args.host)
    import ray
    from ray import serve

    from .app import deployment

    app = deployment(os.path.abspath(args.checkpoint), args.task, device=args.device, dtype=args.dtype,
                     max_batch_size=args.max_batch_size, batch_wait_timeout_s=args.batch_wait_ms / 1000,
                     num_replicas=args.replicas, gpus_per_replica=args.gpus_per_replica,
                     cpus_per_replica=args.cpus_per_replica, limits=limits, served_model_name=args.served_model_name,
                     max_concurrent_requests=args.max_concurrent_requests, request_timeout_s=args.request_timeout_s,
                     quantize=args.quantize, engine=_engine_options(args), max_batch_tokens=args.max_batch_tokens)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs handlers of its own
        signal.signal(sig, lambda *_: stop.set())
    quiet = {"log_level": "WARNING", "enable_access_log": args.access_log}
    try:
        serve.start(http_options={"host": args.host, "port": args.port}, logging_config=quiet)
        serve.run(app, name="trifuse", route_prefix="/", logging_config=quiet)
        url = f"http://{args.host}:{args.port}/"
        print(f"trifuse serve: {args.task} on {args.checkpoint} at {url} "
              f"(POST {{\"inputs\": ..., \"parameters\": {{...}}}}; OpenAI routes under {url}v1/; "
              f"GET {url}stats, {url}metrics; health {url}-/healthz)", flush=True)
        print(f"trifuse serve: Ray at {ray.get_runtime_context().gcs_address} (compose more apps with "
              f"ray.init(address=...) and serve.run)", flush=True)
        while not stop.wait(0.5):
            pass
        print("trifuse serve: shutting down", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0
