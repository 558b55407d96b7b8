"""epdserve: Encode / Prefill / Decode disaggregated serving for multimodal LLMs.

Importing this package does no work: no torch, no network, no environment reads.
"""

__version__ = "0.1.0"
