"""What a request may ask for: the body, the options' types, the sizes (capped), the images.

Everything here runs before any work: a request that fails a check is answered 4xx with a
one-line reason naming the option (and, past a cap, the limit and the flag that raises it),
and costs the server nothing more.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Optional

#: largest request body accepted, in bytes (a larger one is answered 413)
MAX_BODY_BYTES = 8 * 2**20


class BadRequest(Exception):
    """A request the server will not run; becomes an HTTP 4xx with this one-line message.

    ``status``: 400 malformed, 404 unknown route or model, 413 body too large, 422 a valid
    request past a limit or that the model cannot take, 429 full, 504 past the timeout.
    ``param``: the option at fault, when there is one (OpenAI's error field)."""

    def __init__(self, message: str, status: int = 400, param: Optional[str] = None):
        super().__init__(message)
        self.status, self.param = status, param


def one_line(e: BaseException) -> str:
    """``Type: first line`` of an exception, at most 500 characters."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:500]


@dataclass(frozen=True)
class Limits:
    """The largest request a replica takes; each has a ``trifuse serve`` flag to raise it."""

    max_inputs: int = 64  #: inputs per request (``--max-inputs-per-request``)
    max_new_tokens: int = 256  #: new tokens per sequence (``--max-new-tokens``); OpenAI's max_tokens
    max_num_beams: int = 4  #: beams per input (``--max-num-beams``)
    max_return_sequences: int = 4  #: sequences per input (``--max-return-sequences``); OpenAI's n
    max_image_pixels: int = 4096 * 4096  #: width x height of one image (``--max-image-pixels``)
    max_body_bytes: int = MAX_BODY_BYTES  #: request body (``--max-body-bytes``)
    image_dir: Optional[str] = None  #: a directory whose images requests may name (``--allow-image-dir``)

    def __post_init__(self):
        for name in ("max_inputs", "max_new_tokens", "max_num_beams", "max_return_sequences", "max_image_pixels",
                     "max_body_bytes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"Limits.{name} must be a positive int, got {v!r}")
        if self.image_dir is not None and not os.path.isdir(self.image_dir):
            raise ValueError(f"image_dir {self.image_dir!r} is not a directory")


_FLAGS = {"max_inputs": "--max-inputs-per-request", "max_new_tokens": "--max-new-tokens",
          "max_num_beams": "--max-num-beams", "max_return_sequences": "--max-return-sequences",
          "max_image_pixels": "--max-image-pixels", "max_body_bytes": "--max-body-bytes"}


def over_limit(what: str, value, limits: Limits, field: str, param: Optional[str] = None) -> BadRequest:
    return BadRequest(f"{what} is {value}, over this server's limit of {getattr(limits, field)} "
                      f"(raise it with trifuse serve {_FLAGS[field]})", 422, param or what)


def parse_request(body: bytes, limits: Optional[Limits] = None) -> tuple[Any, dict]:
    """``(inputs, parameters)`` from a ``POST /`` body, or :class:`BadRequest`."""
    payload = parse_json(body, limits)
    if not isinstance(payload, dict) or "inputs" not in payload:
        raise BadRequest('the body must be a JSON object {"inputs": ..., "parameters": {...}}')
    unknown = set(payload) - {"inputs", "parameters"}
    if unknown:
        raise BadRequest(f"unknown field(s) {sorted(unknown)}; expected 'inputs' and optional 'parameters'")
    params = payload.get("parameters")
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise BadRequest(f"'parameters' must be a JSON object, got {_json_type(params)}", param="parameters")
    inputs = payload["inputs"]
    if inputs is None or (isinstance(inputs, list) and not inputs):
        raise BadRequest("'inputs' is empty", param="inputs")
    return inputs, params


def parse_json(body: bytes, limits: Optional[Limits] = None):
    cap = (limits or Limits()).max_body_bytes
    if len(body) > cap:
        raise BadRequest(f"request body of {len(body)} bytes is over the {cap}-byte limit "
                         f"(raise it with trifuse serve --max-body-bytes)", 413)
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadRequest(f"malformed JSON: {e}") from None


def stream_option(params: dict) -> tuple[bool, dict]:
    """``(stream, parameters without 'stream')``: whether a request asks for a streamed answer."""
    params = dict(params)
    stream = params.pop("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest(f"'stream' must be true or false, got {json.dumps(stream)[:60]}", param="stream")
    return stream, params


def _json_type(v) -> str:
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "an array",
            dict: "an object", type(None): "null"}.get(type(v), type(v).__name__)


# -- options: types before work, sizes capped ---------------------------------------------

_BOOL = {"do_sample", "return_full_text", "return_text", "return_tensors", "skip_special_tokens",
         "clean_up_tokenization_spaces", "output_attentions", "normalize_embeddings", "convert_to_tensor",
         "handle_impossible_answer", "align_to_words", "multi_label"}
_INT = {"max_new_tokens", "min_new_tokens", "max_length", "min_length", "num_beams", "num_return_sequences",
        "no_repeat_ngram_size", "max_answer_len", "max_seq_len", "doc_stride", "max_question_len"}
_FLOAT = {"temperature", "top_p", "repetition_penalty", "length_penalty", "timeout"}
_TOKEN = {"eos_token_id", "pad_token_id", "decoder_start_token_id", "forced_bos_token_id", "forced_eos_token_id"}
#: options the server sets, never a request
_SERVER_ONLY = {"batch_size", "max_batch_tokens", "progress", "generator", "device", "dtype"}
_TOKEN_ID_MAX = 2**31 - 1


def _check_type(name: str, v) -> None:
    if v is None:
        return
    if name in _BOOL and not isinstance(v, bool):
        raise BadRequest(f"'{name}' must be true or false, got {_json_type(v)} {json.dumps(v)[:40]}", param=name)
    if name in _INT and (isinstance(v, bool) or not isinstance(v, int)):
        raise BadRequest(f"'{name}' must be a whole number, got {_json_type(v)} {json.dumps(v)[:40]}", param=name)
    if name in _FLOAT and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
        raise BadRequest(f"'{name}' must be a finite number, got {_json_type(v)} {json.dumps(v)[:40]}", param=name)
    if name in _TOKEN:
        ids = v if isinstance(v, list) and name in ("eos_token_id", "forced_eos_token_id") else [v]
        if not ids or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i <= _TOKEN_ID_MAX for i in ids):
            raise BadRequest(f"'{name}' must be a token id (a whole number 0..{_TOKEN_ID_MAX}"
                             f"{' or a list of them' if len(ids) > 1 or isinstance(v, list) else ''}), "
                             f"got {json.dumps(v)[:40]}", param=name)
    if name == "early_stopping" and not (isinstance(v, bool) or v == "never"):
        raise BadRequest(f"'early_stopping' must be true, false or \"never\", got {json.dumps(v)[:40]}", param=name)
    if name == "top_k" and (isinstance(v, bool) or not isinstance(v, int)):
        raise BadRequest(f"'top_k' must be a whole number, got {_json_type(v)} {json.dumps(v)[:40]}", param=name)


def check_parameters(params: dict, limits: Limits, prompt_room: int = 4096) -> None:
    """Every option's type, then every size a request can ask for, against ``limits``.
    ``prompt_room``: the longest prompt the model takes (what ``max_length`` may add to the
    new-token cap, since it counts the prompt). Unknown options are left to the pipeline,
    which names them."""
    for name, v in params.items():
        if name in _SERVER_ONLY:
            raise BadRequest(f"'{name}' is set by the server, not by a request", param=name)
        _check_type(name, v)
    for name in ("max_new_tokens", "min_new_tokens"):
        v = params.get(name)
        if v is not None and v > limits.max_new_tokens:
            raise over_limit(name, v, limits, "max_new_tokens")
    for name in ("max_length", "min_length"):
        v = params.get(name)
        if v is not None and v > limits.max_new_tokens + prompt_room:
            raise BadRequest(f"{name} is {v}, over this server's limit of {limits.max_new_tokens + prompt_room} "
                             f"(the prompt's {prompt_room} positions + --max-new-tokens "
                             f"{limits.max_new_tokens})", 422, name)
    v = params.get("num_beams")
    if v is not None and v > limits.max_num_beams:
        raise over_limit("num_beams", v, limits, "max_num_beams")
    v = params.get("num_return_sequences")
    if v is not None and v > limits.max_return_sequences:
        raise over_limit("num_return_sequences", v, limits, "max_return_sequences")
    v = params.get("no_repeat_ngram_size")
    if v is not None and v > limits.max_new_tokens + prompt_room:
        raise over_limit("no_repeat_ngram_size", v, limits, "max_new_tokens")
    for name in ("max_new_tokens", "num_beams", "num_return_sequences", "max_seq_len", "doc_stride", "max_answer_len",
                 "max_question_len"):
        v = params.get(name)
        if v is not None and v < (0 if name == "doc_stride" else 1):
            raise BadRequest(f"'{name}' must be >= {0 if name == 'doc_stride' else 1}, got {v}", param=name)


def check_inputs(inputs, limits: Limits, single: bool) -> None:
    if not single and isinstance(inputs, list) and len(inputs) > limits.max_inputs:
        raise over_limit("the number of inputs", len(inputs), limits, "max_inputs", "inputs")


# -- images: bytes, never a path from a request ----------------------------------------------


def image_from_request(value, limits: Limits):
    """A PIL image from a request's image: base64 or a ``data:`` URI (bytes, never a path), or a
    path inside ``limits.image_dir`` when the operator allowed one (returned as a path for the
    engine's loader). Anything else is :class:`BadRequest`; the header's size is checked
    against ``limits.max_image_pixels`` before the pixels are decoded."""
    if not isinstance(value, str):
        raise BadRequest(f"an image is a base64 string or a data: URI, got {_json_type(value)}", param="inputs")
    text = value.strip()
    if text.startswith("data:"):
        head, sep, data = text.partition(",")
        if not sep or not head.endswith(";base64"):
            raise BadRequest("a data: URI image must be base64 (data:image/png;base64,...)", param="inputs")
        text = data
    elif limits.image_dir is not None and not _looks_base64(text):
        return _allowed_path(text, limits)
    try:
        raw = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        hint = "" if limits.image_dir is None else f" or a path inside {limits.image_dir}"
        raise BadRequest("an image is sent as base64 or a data: URI" + hint + "; this server opens no path a "
                         "request names" + ("" if limits.image_dir else " (see trifuse serve --allow-image-dir)"),
                         param="inputs") from None
    return _decode_image(raw, limits)


def _looks_base64(text: str) -> bool:
    return len(text) % 4 == 0 and len(text) >= 16 and "/" not in text[:1] and "." not in text


def _allowed_path(text: str, limits: Limits) -> str:
    root = os.path.realpath(limits.image_dir)
    path = os.path.realpath(os.path.join(root, text))
    if os.path.commonpath([root, path]) != root or not os.path.isfile(path):
        raise BadRequest(f"no image {text!r} inside the allowed directory {limits.image_dir}", param="inputs")
    return path


def _decode_image(raw: bytes, limits: Limits):
    """The image in ``raw``: its size read from the header and checked first, then loaded by the
    engine's loader, as transformers loads images (EXIF orientation, RGB)."""
    from PIL import Image, UnidentifiedImageError

    from trifuse.engine.images import load_image

    try:
        w, h = Image.open(io.BytesIO(raw)).size  # the header only: nothing decoded yet
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise BadRequest(f"not an image PIL can read: {one_line(e)}", param="inputs") from None
    if w * h > limits.max_image_pixels:
        raise BadRequest(f"the image is {w}x{h} = {w * h} pixels, over this server's limit of "
                         f"{limits.max_image_pixels} (raise it with trifuse serve --max-image-pixels)", 422, "inputs")
    try:
        return load_image(raw, allow_paths=False)
    except (ValueError, TypeError, OSError, Image.DecompressionBombError) as e:
        raise BadRequest(f"not an image PIL can read: {one_line(e)}", param="inputs") from None
