"""Encode service: image bytes -> vision tower + projector -> embeddings in mmcache."""
