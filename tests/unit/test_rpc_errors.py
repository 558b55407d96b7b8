"""A stage call's failure as the router sees it: the peer going away (UNAVAILABLE, UNKNOWN, or a
CANCELLED the router did not ask for: the replica stopped or its engine failed) is UnavailableError,
so the call is re-sent or the stream ends UNAVAILABLE, never reported to the client as its own
cancel; other codes keep their type and the retry hint."""

from __future__ import annotations

import grpc
import pytest

from epdserve.errors import RETRY_AFTER_METADATA, InvalidArgumentError, ResourceExhaustedError, UnavailableError
from epdserve.transport.errors import from_rpc_error

pytestmark = pytest.mark.unit


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str = "", trailing=()) -> None:
        self._code, self._details, self._trailing = code, details, trailing

    def code(self):
        return self._code

    def details(self):
        return self._details

    def trailing_metadata(self):
        return self._trailing


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED])
def test_a_peer_going_away_is_unavailable(code):
    error = from_rpc_error(FakeRpcError(code, "server shutting down"), peer="decode")
    assert isinstance(error, UnavailableError) and error.message == "decode stage unavailable: server shutting down"


def test_other_codes_keep_their_type_and_retry_hint():
    assert isinstance(from_rpc_error(FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT, "bad"), peer="encode"),
                      InvalidArgumentError)
    busy = from_rpc_error(FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "full", ((RETRY_AFTER_METADATA, "2.5"),)),
                          peer="prefill")
    assert isinstance(busy, ResourceExhaustedError) and busy.retry_after_s == 2.5
    assert not isinstance(from_rpc_error(FakeRpcError(grpc.StatusCode.CANCELLED, "x")), UnavailableError)
