"""Engine pieces shared by prefill and decode: KV storage, sampling, generation steps."""
