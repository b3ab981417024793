"""Gradient buffers reused from one training step to the next (CPU only).

The sparse decode and the fused TopK encoder write the multi-GB gradients of ``W_dec``
and ``W_enc`` themselves; on the CPU a fresh tensor of that size is page-faulted in by the
kernel every step, measured at ~1 GB/s on the project's machines (2.2 s per step for the
2.9 GB ``W_dec`` gradient at the paper shape), while zeroing a resident one runs at memory
bandwidth (~0.3 s). The CUDA caching allocator already reuses memory, so recycling is
CPU-only.

THIS MODULE USES A PRIVATE TORCH CALL: ``_storage_Use_Count`` of torch's C extension (and
the storage's ``_cdata`` handle), the only way to ask how many tensors view a storage,
which the safety rule below needs. It is kept because of what it buys, measured by
``benchmarks/bench_train_step.py`` (row ``breakdown_step_full_no_recycling`` of
``docs/benchmarks.md``: the whole sparse step with the recycler switched off). If a torch
release drops the call, `storage_use_count_available()` is False and every recycler
falls back to fresh gradients (the behaviour without recycling; same results, slower
steps on the CPU); ``GradientRecycler(enabled=False)`` or ``GRAD_RECYCLER.enabled =
False`` does the same by choice.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary


def storage_use_count_available() -> bool:
    """Whether this torch still has the private call the recycler needs (see the module)."""
    return hasattr(torch._C, "_storage_Use_Count")


def _storage_use_count(tensor: Tensor) -> int:
    """References to ``tensor``'s storage (tensors and views), as counted by c10."""
    return torch._C._storage_Use_Count(tensor.untyped_storage()._cdata)


class GradientRecycler:
    """Hands out parameter-shaped gradient tensors that reuse last step's storage (CPU).

    Safety rule: a buffer is reused only when nothing but the recycler references its
    storage (the storage's use count is back to what it was when the buffer was made),
    i.e. after ``zero_grad(set_to_none=True)`` dropped the gradient that viewed it.
    Otherwise (gradient accumulation, ``zero_grad(set_to_none=False)``, a caller keeping
    the gradient, a second decode of the same weight in one step) a fresh tensor is
    returned, exactly as without recycling. What is returned is always a new view
    (``detach()``), so autograd adopts it as ``param.grad`` without a copy.
    Disabled while ``torch.compile`` traces.

    Args:
        enabled: Recycle (True) or always hand out fresh tensors (False, the fallback);
            None: recycle when `storage_use_count_available()`. The attribute `enabled`
            can be switched later (the benchmarks time a step without recycling).
    """

    def __init__(self, enabled: bool | None = None) -> None:
        self._buffers: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.enabled = storage_use_count_available() if enabled is None else enabled

    def zeros_like(self, weight: Tensor) -> Tensor:
        """A zeroed tensor shaped, typed and laid out like ``weight``."""
        buffer = self._reusable(weight)
        return torch.zeros_like(weight) if buffer is None else buffer.zero_().detach()

    def empty_like(self, weight: Tensor) -> Tensor:
        """An uninitialised tensor like ``weight`` (for gradients written in full)."""
        buffer = self._reusable(weight)
        return torch.empty_like(weight) if buffer is None else buffer.detach()

    def reserve(self, weights: Sequence[Tensor]) -> None:
        """Allocate (and fault in) the buffers of ``weights`` now, e.g. before timing.

        Args:
            weights: Parameters whose gradients the sparse decode or the fused encoder
                will produce (``W_dec[s]``, ``W_enc``).
        """
        for weight in weights:
            buffer = self._reusable(weight)
            if buffer is not None:
                buffer.zero_()

    def clear(self) -> None:
        """Drop every buffer (their memory is freed once no gradient views them)."""
        self._buffers = WeakIdKeyDictionary()

    def nbytes(self) -> int:
        """Bytes held by the buffers."""
        return sum(buffer.nbytes for buffer, _ in self._buffers.values())

    def _reusable(self, weight: Tensor) -> Tensor | None:
        if (
            not self.enabled
            or weight.device.type != "cpu"
            or not weight.is_contiguous()
            or torch.compiler.is_compiling()
        ):
            return None
        entry = self._buffers.get(weight)
        if entry is None:
            buffer = torch.empty_like(weight)
            self._buffers[weight] = (buffer, _storage_use_count(buffer))
            return buffer
        buffer, idle_count = entry
        same = buffer.shape == weight.shape and buffer.dtype == weight.dtype
        if not same:
            del self._buffers[weight]
            return self._reusable(weight)
        return buffer if _storage_use_count(buffer) == idle_count else None


GRAD_RECYCLER = GradientRecycler()
"""The recycler the sparse decode and the fused TopK encoder take gradients from."""
