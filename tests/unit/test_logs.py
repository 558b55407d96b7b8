"""Log formats: `--log-format json` writes one parseable JSON object per record, and the router's
per-request line carries its fields (ids, outcome, path, tokens, latencies) as JSON keys."""

from __future__ import annotations

import io
import json
import logging
import sys

import pytest

from epdserve.logs import JsonFormatter, setup_logging
from services.router.metrics import RouterMetrics
from services.runtime import service_arg_parser


def _json_line(record: logging.LogRecord) -> dict:
    line = JsonFormatter().format(record)
    assert "\n" not in line
    return json.loads(line)


def test_a_record_is_one_json_line_with_its_fields_and_exception():
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        record = logging.LogRecord("epdserve.x", logging.ERROR, __file__, 1, "failed: %s", ("\"quoted\"",),
                                   sys.exc_info())
    record.fields = {"request_id": "r1", "weird": object()}
    line = _json_line(record)
    assert line["level"] == "ERROR" and line["logger"] == "epdserve.x" and line["message"] == 'failed: "quoted"'
    assert line["request_id"] == "r1" and line["weird"].startswith("<object")
    assert "ValueError: boom" in line["exception"] and line["time"].endswith("+00:00")


def test_the_routers_request_line_carries_its_fields(caplog):
    from services.router.orchestrator import Finished

    record = RouterMetrics().begin()
    record.request_id, record.images, record.trace_id = "r7", 2, "abc"
    record.chunk(1)
    record.finished(Finished("length", 11, 0, 1, {"local_prefill": 0.0}))
    with caplog.at_level(logging.INFO, logger="epdserve.router.requests"):
        record.end(None)
    line = _json_line(caplog.records[-1])
    assert {k: line[k] for k in ("request_id", "trace_id", "outcome", "code", "path", "images", "prompt_tokens",
                                 "completion_tokens")} == {
        "request_id": "r7", "trace_id": "abc", "outcome": "ok", "code": "OK", "path": "E->P->D", "images": 2,
        "prompt_tokens": 11, "completion_tokens": 1}
    assert line["ttft_ms"] >= 0 and line["e2e_ms"] >= line["ttft_ms"]
    assert line["message"].startswith("request id=r7 trace_id=abc outcome=ok")   # the text form, unchanged


def test_setup_writes_json_lines_and_refuses_unknown_formats(monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        setup_logging("INFO", "json")
        logging.getLogger("epdserve.t").info("hello %d", 3)
        assert json.loads(stream.getvalue().splitlines()[-1])["message"] == "hello 3"
    finally:
        root.handlers[:], _ = saved[0], root.setLevel(saved[1])
    with pytest.raises(ValueError, match="text, json"):
        setup_logging("INFO", "xml")


def test_services_take_the_log_format_flag():
    parser = service_arg_parser("encode", None)
    assert parser.parse_args(["--log-format", "json"]).log_format == "json"
    with pytest.raises(SystemExit):
        parser.parse_args(["--log-format", "xml"])
