"""Triton kernels (CUDA only; each module imports triton, so import them lazily, never from a package
`__init__`). `paged_decode`: split-K decode attention over a paged KV cache."""
