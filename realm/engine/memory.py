"""What memory holds: this process's resident bytes, and the bytes a model's weights take."""

from __future__ import annotations

import enum
from typing import Any

import numpy as np
import torch

from realm.models.gguf_file import TensorData


def rss_bytes() -> int:
    """This process's resident memory now (Linux; 0 where /proc is absent)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def weight_bytes(weights: Any) -> int:
    """Bytes of the tensors reachable from a model's weights, each storage counted once.
    Views into the file's memory map (TensorData) are not counted: those are file pages."""
    seen_storage: set[int] = set()
    seen_obj: set[int] = set()
    total = 0
    stack = [weights]
    while stack:
        obj = stack.pop()
        if isinstance(obj, torch.Tensor) and obj.is_mkldnn:  # oneDNN's own layout: no storage to share
            if id(obj) not in seen_obj:
                seen_obj.add(id(obj))
                total += obj.numel() * obj.element_size()
        elif isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            if storage.data_ptr() not in seen_storage:
                seen_storage.add(storage.data_ptr())
                total += storage.nbytes()
        elif isinstance(obj, (list, tuple)):
            stack.extend(obj)
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (TensorData, np.ndarray, enum.Enum, type, str, bytes, int, float)) or obj is None:
            continue
        elif hasattr(obj, "__dict__") and id(obj) not in seen_obj:
            seen_obj.add(id(obj))
            stack.extend(vars(obj).values())
    return total
