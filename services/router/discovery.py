"""Kubernetes service discovery for the router's replica pools: a stage address
`k8s://NAMESPACE/SERVICE[:PORT_NAME]` makes that pool follow the Service's EndpointSlices (watched
through the `kubernetes` client), instead of a static list.

Invariant: the pool's members are exactly the ready endpoints (conditions.ready not false) of the
Service's current EndpointSlices, each at the slice's port of that name (or its only port); a
slice's MODIFIED event replaces everything that slice said, DELETED forgets it, BOOKMARK changes
nothing, and ERROR (e.g. 410 Gone) makes the watcher list the slices afresh. `EndpointSlices` is
pure (API-shaped dicts in, addresses out) so that recorded events test it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from collections.abc import Callable, Iterable

log = logging.getLogger(__name__)
SCHEME = "k8s://"
SERVICE_LABEL = "kubernetes.io/service-name"


@dataclasses.dataclass(frozen=True)
class ServiceRef:
    namespace: str
    service: str
    port_name: str = ""  # "" = the slice's only port

    @classmethod
    def parse(cls, address: str) -> "ServiceRef":
        """`k8s://NAMESPACE/SERVICE[:PORT_NAME]`; raises ValueError naming what is wrong."""
        if not address.startswith(SCHEME):
            raise ValueError(f"{address!r} is not a {SCHEME}NAMESPACE/SERVICE[:PORT_NAME] address")
        namespace, _, rest = address[len(SCHEME):].partition("/")
        service, _, port_name = rest.partition(":")
        if not namespace or not service or "/" in service:
            raise ValueError(f"{address!r}: expected {SCHEME}NAMESPACE/SERVICE[:PORT_NAME]")
        return cls(namespace, service, port_name)


def is_discovered(addresses: Iterable[str]) -> bool:
    return any(a.startswith(SCHEME) for a in addresses)


class EndpointSlices:
    """The ready addresses of one Service, from its EndpointSlice events (API-shaped dicts)."""

    def __init__(self, ref: ServiceRef) -> None:
        self.ref = ref
        self._slices: dict[str, list[str]] = {}

    def addresses(self) -> list[str]:
        return sorted({a for addresses in self._slices.values() for a in addresses})

    def apply(self, event: dict) -> bool:
        """Apply one watch event; True when the address set changed. Raises ResyncNeeded on ERROR."""
        kind, obj = event.get("type"), event.get("object") or {}
        if kind == "ERROR":
            raise ResyncNeeded(str(obj.get("message") or obj))
        if kind == "BOOKMARK":
            return False
        name = (obj.get("metadata") or {}).get("name", "")
        before = self.addresses()
        if kind == "DELETED":
            self._slices.pop(name, None)
        elif kind in ("ADDED", "MODIFIED"):
            self._slices[name] = self._ready_addresses(obj)
        else:
            log.warning("ignoring EndpointSlice event of type %r", kind)
        return self.addresses() != before

    def replace(self, slices: Iterable[dict]) -> bool:
        """A fresh list of the Service's slices (after ERROR or at start)."""
        before = self.addresses()
        self._slices = {(s.get("metadata") or {}).get("name", ""): self._ready_addresses(s) for s in slices}
        return self.addresses() != before

    def _ready_addresses(self, obj: dict) -> list[str]:
        port = self._port(obj.get("ports") or [])
        if port is None:
            return []
        found = []
        for endpoint in obj.get("endpoints") or []:
            if (endpoint.get("conditions") or {}).get("ready") is False:
                continue
            for ip in endpoint.get("addresses") or []:
                found.append(f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}")
        return found

    def _port(self, ports: list[dict]) -> int | None:
        if self.ref.port_name:
            return next((p.get("port") for p in ports if p.get("name") == self.ref.port_name), None)
        return ports[0].get("port") if len(ports) == 1 else None


class ResyncNeeded(Exception):
    """The watch ended with an ERROR event: list the slices again."""


class EndpointSliceWatcher:
    """Watches one Service's EndpointSlices in a daemon thread (the `kubernetes` client is
    synchronous) and calls `on_change(addresses)` on the event loop whenever the ready set changes.
    Uses the in-cluster service account, else the local kubeconfig."""

    def __init__(self, ref: ServiceRef, on_change: Callable[[list[str]], None]) -> None:
        self.ref, self.on_change = ref, on_change
        self.slices = EndpointSlices(ref)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        from kubernetes import client, config  # optional dependency: pip install 'epdserve[kubernetes]'

        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        api, loop = client.DiscoveryV1Api(), asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, args=(api, loop), daemon=True,
                                        name=f"k8s-watch-{self.ref.service}")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self, api, loop: asyncio.AbstractEventLoop) -> None:
        from kubernetes import watch

        namespace, selector = self.ref.namespace, f"{SERVICE_LABEL}={self.ref.service}"
        serialize = api.api_client.sanitize_for_serialization

        def list_slices() -> tuple[list[dict], str]:
            listed = api.list_namespaced_endpoint_slice(namespace, label_selector=selector)
            return [serialize(s) for s in listed.items], listed.metadata.resource_version

        def watch_events(version: str):
            for event in watch.Watch().stream(api.list_namespaced_endpoint_slice, namespace, label_selector=selector,
                                              timeout_seconds=60, resource_version=version):
                yield {"type": event["type"], "object": serialize(event["object"])}

        self.follow(list_slices, watch_events, lambda: self._notify(loop))

    def follow(self, list_slices: Callable[[], tuple[list[dict], str]], watch_events: Callable[[str], Iterable[dict]],
               notify: Callable[[], None], retry_s: float = 2.0) -> None:
        """List, then watch from the listed version, until stop(); `notify()` after every change of
        the ready set. An ERROR event lists again at once; a failure keeps the last known members
        and retries after `retry_s`."""
        while not self._stop.is_set():
            try:
                items, version = list_slices()
                if self.slices.replace(items):
                    notify()
                for event in watch_events(version):
                    if self._stop.is_set():
                        return
                    if self.slices.apply(event):
                        notify()
            except ResyncNeeded as exc:
                log.info("EndpointSlice watch of %s: %s; listing again", self.ref.service, exc)
            except Exception as exc:  # API server away: keep the last known members, retry
                log.warning("EndpointSlice watch of %s failed: %s", self.ref.service, exc)
                self._stop.wait(retry_s)

    def _notify(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.call_soon_threadsafe(self.on_change, self.slices.addresses())
