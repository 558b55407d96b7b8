"""gRPC plumbing shared by every service: server lifecycle (health, drain, ready file),
channels, and the mapping between typed errors and gRPC status codes. Generated stubs
live in `epdserve.v1` (their import path is fixed by the proto package)."""
