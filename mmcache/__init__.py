"""mmcache: the Redis-indexed cache and data plane for image embeddings and KV layers.

Redis holds the index (key -> owner, host, address, location, dtype, shape, nbytes, checksum, TTL);
the bytes stay in the producer's shared memory and are read in place on the same host or
streamed from the owner over gRPC. See `mmcache.client` for the ownership / release protocol.
Importing this package is cheap: submodules load on use.
"""

__all__ = ["keys", "codec", "index", "store", "transfer", "client"]
