"""Host memory page-locked in place (cudaHostRegister), so the GPU copies into and out of it
directly (DMA) and asynchronously.

Registered memory is exactly the size asked for, where torch's caching host allocator
(`pin_memory=True`) rounds each block up to a power of two; the caller unregisters it (`unpin`)
before the memory goes away.
"""

from __future__ import annotations

import torch

PORTABLE = 1  # cudaHostRegisterPortable: page-locked for every CUDA context of the process


def page_lock(pointer: int, nbytes: int, *, what: str = "host memory") -> None:
    """Register [pointer, pointer + nbytes) with CUDA. Raises RuntimeError when it cannot be."""
    if nbytes <= 0:
        return
    error = int(torch.cuda.cudart().cudaHostRegister(pointer, nbytes, PORTABLE))
    if error:
        _drop_last_error()
        raise RuntimeError(f"cannot page-lock {nbytes / 2**30:.1f} GiB of {what} (cudaHostRegister error "
                           f"{error}): use less host memory or raise the memlock limit")


def page_locked(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` (CPU, contiguous) page-locked in place; unregister it (`unpin([tensor.data_ptr()])`)
    before dropping it. Raises RuntimeError when it cannot be."""
    if tensor.numel():
        page_lock(tensor.data_ptr(), tensor.nbytes)
    return tensor


def pinned_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zero-filled CPU tensor page-locked in place (see `page_locked`)."""
    return page_locked(torch.zeros(shape, dtype=dtype))


def unpin(pointers: list[int]) -> None:
    for pointer in pointers:
        if int(torch.cuda.cudart().cudaHostUnregister(pointer)):
            _drop_last_error()


def _drop_last_error() -> None:
    """A failed CUDA runtime call leaves its error with this thread, and the next kernel launch
    check here reports it as that kernel's failure; launch one now and drop what it reports."""
    try:
        torch.empty(1, device="cuda").zero_()
    except RuntimeError:
        pass
