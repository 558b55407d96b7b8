"""Decode service: pulls a prompt's KV from mmcache and streams generated tokens."""
