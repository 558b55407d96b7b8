"""Kubernetes discovery on recorded EndpointSlice events (API-shaped JSON, as the watch delivers
them): ready endpoints at the named port become the pool's addresses; not-ready endpoints, other
ports, deleted slices and bookmarks are handled; an ERROR event asks for a fresh list; addresses
and config are validated with the field named."""

from __future__ import annotations

import json

import pytest

from epdserve.config import RouterConfig
from services.router.discovery import EndpointSlices, ResyncNeeded, ServiceRef

pytestmark = pytest.mark.unit

# one watch session of Service "epd-prefill" (two slices), recorded as JSON lines
RECORDED = """
{"type": "ADDED", "object": {"metadata": {"name": "epd-prefill-abc", "resourceVersion": "100"}, "addressType": "IPv4",
 "ports": [{"name": "grpc", "port": 50051, "protocol": "TCP"}, {"name": "metrics", "port": 9400}],
 "endpoints": [{"addresses": ["10.0.0.11"], "conditions": {"ready": true}, "targetRef": {"name": "prefill-0"}},
               {"addresses": ["10.0.0.12"], "conditions": {"ready": false}, "targetRef": {"name": "prefill-1"}}]}}
{"type": "ADDED", "object": {"metadata": {"name": "epd-prefill-def", "resourceVersion": "101"}, "addressType": "IPv6",
 "ports": [{"name": "grpc", "port": 50051}], "endpoints": [{"addresses": ["fd00::13"]}]}}
{"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "150"}}}
{"type": "MODIFIED", "object": {"metadata": {"name": "epd-prefill-abc", "resourceVersion": "160"},
 "ports": [{"name": "grpc", "port": 50051}],
 "endpoints": [{"addresses": ["10.0.0.11"], "conditions": {"ready": true}},
               {"addresses": ["10.0.0.12"], "conditions": {"ready": true}}]}}
{"type": "DELETED", "object": {"metadata": {"name": "epd-prefill-def", "resourceVersion": "170"}}}
{"type": "MODIFIED", "object": {"metadata": {"name": "epd-prefill-abc", "resourceVersion": "180"},
 "ports": [{"name": "grpc", "port": 50051}], "endpoints": null}}
{"type": "ERROR", "object": {"kind": "Status", "code": 410, "message": "too old resource version: 100 (180)"}}
"""


def _events() -> list[dict]:
    text, events, depth, start = RECORDED.strip(), [], 0, 0
    for i, ch in enumerate(text):  # split the pretty-printed lines into top-level objects
        depth += ch == "{"
        depth -= ch == "}"
        if ch == "}" and depth == 0:
            events.append(json.loads(text[start:i + 1]))
            start = i + 1
    return events


def test_recorded_watch_session_gives_the_ready_addresses_at_each_step():
    slices, events = EndpointSlices(ServiceRef("epd", "epd-prefill", "grpc")), _events()
    seen = []
    for event in events[:-1]:
        changed = slices.apply(event)
        seen.append((event["type"], changed, slices.addresses()))
    assert seen == [
        ("ADDED", True, ["10.0.0.11:50051"]),                                   # prefill-1 not ready
        ("ADDED", True, ["10.0.0.11:50051", "[fd00::13]:50051"]),               # IPv6 bracketed
        ("BOOKMARK", False, ["10.0.0.11:50051", "[fd00::13]:50051"]),
        ("MODIFIED", True, ["10.0.0.11:50051", "10.0.0.12:50051", "[fd00::13]:50051"]),
        ("DELETED", True, ["10.0.0.11:50051", "10.0.0.12:50051"]),
        ("MODIFIED", True, []),                                                 # scaled to zero
    ]
    with pytest.raises(ResyncNeeded, match="too old resource version"):
        slices.apply(events[-1])


def test_a_fresh_list_replaces_everything_and_ports_are_chosen_by_name():
    slices = EndpointSlices(ServiceRef("epd", "epd-prefill", "grpc"))
    for event in _events()[:2]:
        slices.apply(event)
    obj = {"metadata": {"name": "new"}, "ports": [{"name": "grpc", "port": 7000}],
           "endpoints": [{"addresses": ["10.1.0.1"]}]}
    assert slices.replace([obj]) and slices.addresses() == ["10.1.0.1:7000"]
    unnamed = EndpointSlices(ServiceRef("epd", "epd-prefill"))  # no port name: the only port, else none
    unnamed.apply(_events()[0])
    assert unnamed.addresses() == []
    unnamed.apply({"type": "ADDED", "object": obj})
    assert unnamed.addresses() == ["10.1.0.1:7000"]


@pytest.mark.parametrize("address, message", [
    ("k8s://ns", "expected k8s://NAMESPACE/SERVICE"),
    ("k8s:///svc", "expected k8s://NAMESPACE/SERVICE"),
    ("http://ns/svc", "is not a k8s://"),
])
def test_bad_addresses_are_refused(address, message):
    with pytest.raises(ValueError, match=message):
        ServiceRef.parse(address)


def test_parsed_address_and_config_rules():
    assert ServiceRef.parse("k8s://epd/epd-decode:grpc") == ServiceRef("epd", "epd-decode", "grpc")
    with pytest.raises(ValueError, match="--prefill: a k8s://NAMESPACE/SERVICE address is the whole pool"):
        RouterConfig(encode=("e:1",), prefill=("k8s://epd/p", "p:1"), decode=("d:1",))
    RouterConfig(encode=("k8s://epd/e",), prefill=("k8s://epd/p",), decode=("k8s://epd/d:grpc",))


def test_the_watcher_lists_watches_resyncs_and_survives_api_failures():
    from services.router.discovery import EndpointSliceWatcher

    events = _events()
    watcher = EndpointSliceWatcher(ServiceRef("epd", "epd-prefill", "grpc"), on_change=None)
    calls, notified = [], []

    def list_slices():
        calls.append("list")
        lists = calls.count("list")
        if lists == 2:
            raise ConnectionError("API server away")  # kept members, retried
        return ([events[0]["object"]] if lists == 1 else [events[3]["object"]]), str(lists)

    def watch_events(version):
        calls.append(f"watch@{version}")
        if version == "1":
            yield from events[1:2]  # the IPv6 slice is added
            yield events[-1]        # 410 Gone: list again
        else:
            watcher.stop()
            yield events[1]

    watcher.follow(list_slices, watch_events, lambda: notified.append(watcher.slices.addresses()), retry_s=0.0)
    assert calls == ["list", "watch@1", "list", "list", "watch@3"]
    assert notified == [["10.0.0.11:50051"], ["10.0.0.11:50051", "[fd00::13]:50051"],
                        ["10.0.0.11:50051", "10.0.0.12:50051"]]
