"""Prefill service: prompt tokens + image embeddings -> KV cache (published to mmcache) + first token."""
