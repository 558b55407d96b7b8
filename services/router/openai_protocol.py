"""OpenAI chat-completions JSON <-> the router's GenerateRequest and events (pure: no I/O).

A request body becomes a `ChatRequest`: the checked fields, the conversation in chat-template form
(each image part an image slot, in place), the images' sources in order, and `GenerationParams`.
The HTTP layer renders the whole conversation with the checkpoint's chat template and sends it
raw (one placeholder where each image part stood), so no message is dropped and every limit is
checked by the router's own validation (`requests.parse_request`, tokenize). Field names in the
router's messages (`params.max_tokens`, `images[1]`) are translated back into the request's own
(`max_tokens`, `messages[2].content[0].image_url.url`), which the error's `param` also names.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import math
import re
import uuid
from typing import Any

from epdserve.errors import EpdserveError, InvalidArgumentError, NotFoundError, ResourceExhaustedError
from epdserve.transport.errors import INTERNAL_MESSAGE
from epdserve.v1 import common_pb2, router_pb2
from services.router.orchestrator import Finished, TextChunk
from services.router.server import Failed

ROLES = ("system", "user", "assistant")
INT32 = (-(1 << 31), (1 << 31) - 1)
# Fields OpenAI defines that this server cannot honour: accepted only at their no-op values.
NO_OP_ONLY: dict[str, tuple[Any, ...]] = {
    "logprobs": (None, False), "top_logprobs": (None, 0), "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0), "logit_bias": (None, {}), "tools": (None, []),
    "tool_choice": (None, "none", "auto"), "response_format": (None, {"type": "text"}),
}
KNOWN = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop", "stream",
         "stream_options", "n", "user", "top_k", "ignore_eos", "image_keep_ratio", "fastkv", "request_id", *NO_OP_ONLY}
FASTKV_FIELDS = {"enabled": bool, "tsp_rate": float, "retain_rate": float, "tsp_length": int, "kv_budget": int}


@dataclasses.dataclass(frozen=True)
class ImageSource:
    field: str             # the url's place in the request, e.g. "messages[0].content[1].image_url.url"
    data: bytes = b""      # a data URL, decoded
    url: str = ""          # an http(s) URL whose host is on the allowlist: fetched before the request runs


@dataclasses.dataclass(frozen=True)
class ChatRequest:
    request_id: str
    model: str
    messages: list[dict]                 # chat-template form: content = [{"type": "image"} | {"type": "text", ...}]
    images: tuple[ImageSource, ...]      # in the order of the image slots
    params: router_pb2.GenerationParams
    stream: bool
    include_usage: bool
    field_names: dict[str, str]          # router field -> request field (images[i], params.max_tokens)


def parse_json(raw: bytes) -> Any:
    """The request body as JSON values; NaN / Infinity and strings with a lone surrogate escape
    (`"\\ud800"`, which no UTF-8 text can carry) are refused, naming the field."""
    try:
        body = json.loads(raw, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise InvalidArgumentError(f"request body: not valid JSON ({str(exc)[:200]})") from None
    if _SURROGATE_ESCAPE.search(raw):
        try:
            where = _lone_surrogate(body, "")
        except RecursionError:
            where = "request body"
        if where is not None:
            raise InvalidArgumentError(f"{where or 'request body'}: not valid Unicode (a lone surrogate escape)")
    return body


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")


def _lone_surrogate(value: Any, where: str) -> str | None:
    """The path of the first string (key or value) in `value` that cannot be encoded as UTF-8."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
            return None
        except UnicodeEncodeError:
            return where
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        inner = f"{where}[{key}]" if isinstance(key, int) else f"{where}.{key}" if where else str(key)
        if isinstance(key, str) and _lone_surrogate(key, "") is not None:
            return where or "request body"
        if (found := _lone_surrogate(item, inner)) is not None:
            return found
    return None


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def parse_chat(body: Any, *, model: str, max_image_bytes: int, allowlist: tuple[str, ...] = (),
               placeholder: str = "<image>") -> ChatRequest:
    """Check a chat-completions body's shape and types; limits are left to the router's validation.
    `placeholder` (the image token's text) may not appear in text: images go in image_url parts.
    Raises InvalidArgumentError (NotFoundError for another model) naming the field."""
    if not isinstance(body, dict):
        raise InvalidArgumentError("request body: must be a JSON object")
    for key in body:
        if key not in KNOWN:
            raise InvalidArgumentError(f"{key}: unrecognized request argument")
        if key in NO_OP_ONLY and body[key] not in NO_OP_ONLY[key]:
            raise InvalidArgumentError(f"{key}: not supported by this server")
    requested = _opt(body, "model", str)
    if requested is not None and requested != model:
        raise NotFoundError(f"model: {requested!r} is not served here (this server serves {model!r})")
    if _opt(body, "n", int) not in (None, 1):
        raise InvalidArgumentError(f"n: only n=1 is supported (got {body['n']})")
    stream = bool(_opt(body, "stream", bool))
    messages, images = _messages(body.get("messages"), _Images(allowlist, max_image_bytes, placeholder))
    params, max_tokens_name = _params(body)
    names = {f"images[{i}]": image.field for i, image in enumerate(images)}
    names["params.max_tokens"] = max_tokens_name
    return ChatRequest(
        request_id=_opt(body, "request_id", str) or f"chatcmpl-{uuid.uuid4().hex}",
        model=model, messages=messages, images=tuple(images), params=params, stream=stream,
        include_usage=_include_usage(body, stream), field_names=names,
    )


def _include_usage(body: dict, stream: bool) -> bool:
    options = _opt(body, "stream_options", dict)
    if options is None:
        return False
    if not stream:
        raise InvalidArgumentError("stream_options: only allowed when stream is true")
    for key in options:
        if key != "include_usage":
            raise InvalidArgumentError(f"stream_options.{key}: unrecognized option")
    return bool(_opt(options, "include_usage", bool, "stream_options."))


def _params(body: dict) -> tuple[router_pb2.GenerationParams, str]:
    params = router_pb2.GenerationParams()
    max_tokens = _opt(body, "max_tokens", int, bounds=INT32)
    max_completion = _opt(body, "max_completion_tokens", int, bounds=INT32)
    if max_tokens is not None and max_completion is not None and max_tokens != max_completion:
        raise InvalidArgumentError("max_completion_tokens: contradicts max_tokens (set one of them)")
    name = "max_tokens" if max_completion is None else "max_completion_tokens"
    if max_completion is not None or max_tokens is not None:
        params.max_tokens = max_completion if max_completion is not None else max_tokens
    for key in ("temperature", "top_p"):
        if (value := _opt(body, key, float)) is not None:
            setattr(params.sampling, key, value)
    if (top_k := _opt(body, "top_k", int, bounds=INT32)) is not None:
        params.sampling.top_k = top_k
    if (seed := _opt(body, "seed", int, bounds=(0, (1 << 64) - 1))) is not None:
        params.sampling.seed = seed
    params.stop.extend(_stop(body.get("stop")))
    params.ignore_eos = bool(_opt(body, "ignore_eos", bool))
    if (ratio := _opt(body, "image_keep_ratio", float)) is not None:
        params.image_keep_ratio = ratio
    if body.get("fastkv") is not None:
        params.fastkv.CopyFrom(_fastkv(body["fastkv"]))
    return params, name


def _stop(stop: Any) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return stop
    raise InvalidArgumentError("stop: must be a string or a list of strings")


def _fastkv(value: Any) -> common_pb2.FastKVSettings:
    if isinstance(value, bool):
        return common_pb2.FastKVSettings(enabled=value)
    if not isinstance(value, dict):
        raise InvalidArgumentError("fastkv: must be a boolean or an object")
    settings = common_pb2.FastKVSettings(enabled=True)
    for key in value:
        if key not in FASTKV_FIELDS:
            raise InvalidArgumentError(f"fastkv.{key}: unrecognized setting")
        got = _opt(value, key, FASTKV_FIELDS[key], "fastkv.", bounds=INT32)
        if got is not None:
            setattr(settings, key, got)
    return settings


@dataclasses.dataclass
class _Images:
    allowlist: tuple[str, ...]
    max_image_bytes: int
    placeholder: str
    found: list[ImageSource] = dataclasses.field(default_factory=list)


def _messages(messages: Any, images: _Images) -> tuple[list[dict], list[ImageSource]]:
    if not isinstance(messages, list) or not messages:
        raise InvalidArgumentError("messages: must be a non-empty list of messages")
    rendered: list[dict] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise InvalidArgumentError(f"{where}: must be an object with role and content")
        for key in message:
            if key not in ("role", "content"):
                raise InvalidArgumentError(f"{where}.{key}: not supported by this server")
        role = message.get("role")
        if role not in ROLES:
            raise InvalidArgumentError(f"{where}.role: must be one of {', '.join(ROLES)} (got {role!r})")
        rendered.append({"role": role, "content": _content(message.get("content"), where, role, images)})
    return rendered, images.found


def _content(content: Any, where: str, role: str, images: _Images) -> list[dict]:
    if isinstance(content, str):
        return [{"type": "text", "text": _text(content, f"{where}.content", images.placeholder)}]
    if not isinstance(content, list):
        raise InvalidArgumentError(f"{where}.content: must be a string or a list of content parts")
    parts: list[dict] = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            parts.append({"type": "text", "text": _text(_required(part, "text", str, f"{at}."), f"{at}.text",
                                                        images.placeholder)})
        elif kind == "image_url":
            if role != "user":
                raise InvalidArgumentError(f"{at}: images are accepted in user messages only")
            images.found.append(_image(part.get("image_url"), f"{at}.image_url", images))
            parts.append({"type": "image"})
        else:
            raise InvalidArgumentError(f"{at}.type: must be 'text' or 'image_url' (got {kind!r})")
    return parts


def _text(text: str, field: str, placeholder: str) -> str:
    if placeholder and placeholder in text:
        raise InvalidArgumentError(f"{field}: must not contain the image placeholder {placeholder!r} "
                                   "(send images as image_url parts)")
    return text


def _image(image_url: Any, where: str, images: _Images) -> ImageSource:
    if not isinstance(image_url, dict):
        raise InvalidArgumentError(f"{where}: must be an object with a url")
    for key in image_url:
        if key not in ("url", "detail"):  # detail (low / high / auto) does not apply: images are encoded as is
            raise InvalidArgumentError(f"{where}.{key}: unrecognized field")
    url = _required(image_url, "url", str, f"{where}.")
    field = f"{where}.url"
    if url.startswith("data:"):
        return ImageSource(field, data=decode_data_url(url, field, images.max_image_bytes))
    return ImageSource(field, url=check_remote_url(url, field, images.allowlist))


def decode_data_url(url: str, field: str, max_image_bytes: int) -> bytes:
    """The bytes of a base64 data URL (`data:image/png;base64,...`)."""
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise InvalidArgumentError(f"{field}: a data URL must be base64 encoded (data:image/png;base64,...)")
    if 3 * (len(payload) // 4) > max_image_bytes + 2:
        raise ResourceExhaustedError(
            f"{field}: about {3 * (len(payload) // 4)} bytes exceeds max_image_bytes ({max_image_bytes})")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidArgumentError(f"{field}: the data URL is not valid base64") from None


def check_remote_url(url: str, field: str, allowlist: tuple[str, ...]) -> str:
    """An http(s) image URL is fetched only when its host is on the allowlist (exact names)."""
    from yarl import URL

    try:
        parsed = URL(url)
    except ValueError:
        raise InvalidArgumentError(f"{field}: not a valid URL") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise InvalidArgumentError(f"{field}: must be a data URL (data:image/png;base64,...) or an http(s) URL")
    if parsed.host.lower() not in {h.lower() for h in allowlist}:
        raise InvalidArgumentError(f"{field}: remote image URLs are not allowed for host {parsed.host!r} "
                                   "(send the image as a data URL, or add the host to --image-url-allowlist)")
    return str(parsed)


def _opt(obj: dict, key: str, kind: type, prefix: str = "", bounds: tuple[int, int] | None = None) -> Any:
    """obj[key] checked against `kind` (JSON null = absent); ints also against `bounds`."""
    value = obj.get(key)
    if value is None:
        return None
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok:
        noun = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", dict: "an object"}[kind]
        raise InvalidArgumentError(f"{prefix}{key}: must be {noun} (got {json.dumps(value)[:40]})")
    if kind is int and bounds is not None and not bounds[0] <= value <= bounds[1]:
        raise InvalidArgumentError(f"{prefix}{key}: must be in [{bounds[0]}, {bounds[1]}] (got {str(value)[:40]})")
    if kind is float:
        try:
            return float(value)
        except OverflowError:  # an integer past the float range
            raise InvalidArgumentError(f"{prefix}{key}: must be a finite number (got {str(value)[:40]}...)") from None
    return value


def _required(obj: dict, key: str, kind: type, prefix: str) -> Any:
    value = _opt(obj, key, kind, prefix)
    if value is None:
        raise InvalidArgumentError(f"{prefix}{key}: is required")
    return value


def generate_request(chat: ChatRequest, prompt: str, images: list[bytes]) -> router_pb2.GenerateRequest:
    """The router request for a chat: `prompt` is the conversation rendered by the chat template."""
    return router_pb2.GenerateRequest(
        request_id=chat.request_id, prompt=prompt, raw=True, params=chat.params,
        images=[common_pb2.ImageInput(data=data) for data in images],
    )


# ---- responses -------------------------------------------------------------------------------------

def usage(finished: Finished) -> dict:
    return {"prompt_tokens": finished.prompt_tokens, "completion_tokens": finished.completion_tokens,
            "total_tokens": finished.prompt_tokens + finished.completion_tokens,
            "prompt_tokens_details": {"image_tokens": finished.image_tokens}}


def completion(chat: ChatRequest, created: int, text: str, finished: Finished) -> dict:
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
              "finish_reason": finished.finish_reason}
    return {"id": chat.request_id, "object": "chat.completion", "created": created, "model": chat.model,
            "choices": [choice], "usage": usage(finished)}


class ChunkStream:
    """The `chat.completion.chunk` objects of one streamed answer, as SSE `data:` lines."""

    def __init__(self, chat: ChatRequest, created: int) -> None:
        self.chat, self.created = chat, created

    def first(self) -> bytes:
        return self._chunk({"role": "assistant", "content": ""})

    def payloads(self, event: TextChunk | Finished | Failed) -> list[bytes]:
        if isinstance(event, TextChunk):
            return [self._chunk({"content": event.text})] if event.text else []
        if isinstance(event, Failed):
            return [sse(error_body(event.error, self.chat.field_names)[1]), DONE]
        out = [self._chunk({}, event.finish_reason)]
        if self.chat.include_usage:
            out.append(sse({**self._base(), "choices": [], "usage": usage(event)}))
        return [*out, DONE]

    def _base(self) -> dict:
        return {"id": self.chat.request_id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.chat.model}

    def _chunk(self, delta: dict, finish_reason: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        extra = {"usage": None} if self.chat.include_usage else {}
        return sse({**self._base(), "choices": [choice], **extra})


DONE = b"data: [DONE]\n\n"


def sse(obj: dict) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n".encode()


# ---- errors ----------------------------------------------------------------------------------------

HTTP_STATUS = {"INVALID_ARGUMENT": 400, "OUT_OF_RANGE": 400, "UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403,
               "NOT_FOUND": 404, "ALREADY_EXISTS": 409, "RESOURCE_EXHAUSTED": 429, "CANCELLED": 499,
               "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504}
ERROR_TYPE = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
              404: "invalid_request_error", 409: "invalid_request_error", 413: "invalid_request_error",
              429: "rate_limit_error", 499: "cancelled", 503: "service_unavailable", 504: "timeout"}
_ROUTER_FIELD = re.compile(r"\bparams\.sampling\.\w+|\bparams\.\w+|\bimages\[\d+\]|^prompt(?=:)|^request_id\b")
_DEFAULT_NAMES = {"prompt": "messages"}


def translate(message: str, field_names: dict[str, str]) -> tuple[str, str | None]:
    """(message with the router's field names replaced by the request's, the first field named)."""
    named: list[str] = []

    def swap(match: re.Match) -> str:
        field = match.group(0)
        name = field_names.get(field) or _DEFAULT_NAMES.get(field) or field.rpartition(".")[2]
        named.append(name)
        return name

    return _ROUTER_FIELD.sub(swap, message), (named[0] if named else None)


def error_body(error: EpdserveError, field_names: dict[str, str]) -> tuple[int, dict, dict[str, str]]:
    """(HTTP status, OpenAI error object, headers) for a typed error. Codes without an HTTP
    counterpart (INTERNAL, FAILED_PRECONDITION, ...) are 500 with no details, as over gRPC for bugs."""
    status = HTTP_STATUS.get(error.code, 500)
    if status == 500:
        message, param = INTERNAL_MESSAGE, None
    else:
        message, param = translate(error.message, field_names)
        param = param or _leading_field(message)
    headers = {}
    if status in (429, 503) and error.retry_after_s is not None:
        headers["Retry-After"] = str(max(0, math.ceil(error.retry_after_s)))
    body = {"error": {"message": message, "type": ERROR_TYPE.get(status, "server_error"), "param": param,
                      "code": error.code.lower()}}
    return status, body, headers


def plain_error(status: int, message: str) -> dict:
    """An error object for failures outside the router's typed errors (no route, body too large)."""
    return {"error": {"message": message, "type": ERROR_TYPE.get(status, "server_error"), "param": None,
                      "code": None}}


def _leading_field(message: str) -> str | None:
    """Errors raised here start with the field they are about: "messages[0].role: ..."."""
    head, sep, _ = message.partition(": ")
    return head if sep and re.fullmatch(r"[A-Za-z_][\w.\[\]]*", head) and head != "request body" else None
