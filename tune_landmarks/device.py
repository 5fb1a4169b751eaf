"""Where a model runs and in which precision: the one policy that training and every evaluation share.

Its own module because both sides need it: run.py places and autocasts the model it trains, infer.py the model
it scores, and neither should reach into the other for it. A number measured in training and one measured by
`evaluate` then come from the same device layout and the same autocast.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch

from .config import rule_error


def resolve_device(name: str) -> torch.device:
    """`auto` is CUDA where there is one; naming CUDA where there is none is an error, not a silent CPU run."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise rule_error("device", name, "auto or cpu: no CUDA device is available here")
    return torch.device(name)


def place(model: torch.nn.Module, device: torch.device) -> Any:
    """The model on `device`, channels_last on CUDA (what its conv kernels prefer); training and every
    evaluation place a model the same way, so they compute the same numbers."""
    model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def amp_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    """What `--mixed-precision` means on `device`: bf16 where the hardware has it, else fp16 (CUDA); None = fp32."""
    if not enabled:
        return None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def autocast(device: torch.device, enabled: bool, dtype: torch.dtype | None = None) -> AbstractContextManager[Any]:
    """Autocast in `dtype` (default: `amp_dtype`'s choice for the device); disabled, it also switches off an
    enclosing autocast."""
    if not enabled:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype or amp_dtype(device, True))


def device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextmanager
def intra_op_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads at `n` for a run (0: as they are), then back: a run in a process that goes on (a
    test suite, a notebook, a benchmark) leaves the thread count, and with it the summation order of every later
    run's kernels, as it found it."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
