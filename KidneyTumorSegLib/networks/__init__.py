"""Network registry: every network the seed papers describe, built by name.

Model manifests name networks with the strings listed by :func:`available`;
:func:`build_network` builds one from keyword arguments. Each network module
registers its classes with :func:`register` when imported below.
"""

from __future__ import annotations

import difflib
import inspect
from typing import Callable, Dict

import torch

_REGISTRY: Dict[str, Callable[..., torch.nn.Module]] = {}


def register(name: str):
    """Class decorator adding a network to the registry under ``name``."""

    def decorator(cls):
        if name in _REGISTRY:
            raise ValueError(f"network name {name!r} registered twice")
        _REGISTRY[name] = cls
        return cls

    return decorator


def available() -> list[str]:
    """Sorted names of all registered networks."""
    return sorted(_REGISTRY)


def build_network(name: str, **kwargs) -> torch.nn.Module:
    """Build the network registered as ``name`` with keyword arguments ``kwargs``.

    Raises ``ValueError`` naming the valid choices for an unknown name or kwarg.
    """
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown network {name!r}; available: {', '.join(available())}.{hint}")
    cls = _REGISTRY[name]
    params = inspect.signature(cls.__init__).parameters
    accepts_var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    valid = [p for p in params if p != "self"]
    unknown = [k for k in kwargs if k not in valid]
    if unknown and not accepts_var_kw:
        raise ValueError(
            f"network {name!r} got unknown argument(s) {', '.join(sorted(unknown))}; "
            f"valid: {', '.join(valid)}"
        )
    return cls(**kwargs)


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of ``model`` (all, or only those requiring grad)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_flops(model: torch.nn.Module, input_shape: tuple[int, ...]) -> int:
    """Floating point operations of one forward pass on a zero tensor of ``input_shape``
    (``[B, C, *spatial]``), counted with ``torch.utils.flop_counter`` (a multiply-add = 2 FLOPs).
    Build the model under ``torch.device("meta")`` to count without computing or allocating."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    # The input follows the model: on the "meta" device the count is instant and allocates nothing.
    device = next(model.parameters(), torch.empty(0)).device
    was_training = model.training
    model.eval()
    try:
        # The counter has no formula for the CPU flash-attention kernel (it would count 0):
        # force the plain-math attention, whose matmuls it counts.
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            model(torch.zeros(input_shape, device=device))
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


# Network modules register themselves on import; one line per module below.
from . import vbnet  # noqa: E402,F401
from . import vnet  # noqa: E402,F401
from . import liu_unet3d  # noqa: E402,F401
from . import resunet3d  # noqa: E402,F401
from . import vnet25d  # noqa: E402,F401
from . import deeplab3d  # noqa: E402,F401
