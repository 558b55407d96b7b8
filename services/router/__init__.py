"""Router service: the front door. Tokenizes, validates, drives Encode -> Prefill -> Decode and
streams text back."""
