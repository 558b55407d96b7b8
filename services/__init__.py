"""The four epdserve services, one package each: encode, prefill, decode, router.
Each runs as its own process: `epdserve serve <stage>` or `python -m services.<stage>`."""
