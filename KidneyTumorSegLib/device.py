"""Device selection, in one place: which names are devices (:func:`parse_device`, no torch
needed, so the Slicer module checks names with it too) and which device a name resolves to
here (:func:`resolve_device`)."""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

DEVICE_CHOICES = ("auto", "cuda", "mps", "cpu")


def parse_device(requested: str | None = "auto") -> str:
    """The device name ``requested`` in canonical form (``auto``, ``cpu``, ``mps``, ``cuda`` or ``cuda:N``);
    raises ``DeviceError`` for anything else. Says nothing about whether the device exists here."""
    from .errors import DeviceError

    req = (requested or "auto").strip().lower()
    base, colon, index = req.partition(":")
    if base in DEVICE_CHOICES and not colon:
        return base
    if base == "cuda" and index.isdigit():  # isdigit: no sign, no spaces
        return f"cuda:{int(index)}"
    raise DeviceError(f"device must be one of {', '.join(DEVICE_CHOICES)} or cuda:N (N = 0, 1, ...), got {requested!r}")


def resolve_device(requested: str = "auto"):
    """Return ``(torch.device, reason)`` for ``requested`` (``auto``, ``cuda``, ``cuda:N``, ``mps`` or ``cpu``).

    ``auto`` prefers CUDA, then Apple MPS, then the CPU. Asking for a device that is not
    available raises ``DeviceError`` (a ValueError) saying what is available.
    """
    import torch

    from .errors import DeviceError

    req = parse_device(requested)
    base = req.split(":")[0]
    cuda_ok = torch.cuda.is_available()
    mps_ok = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    if base == "auto":
        if cuda_ok:
            return torch.device("cuda"), f"auto: CUDA available ({torch.cuda.get_device_name(0)})"
        if mps_ok:
            return torch.device("mps"), "auto: Apple MPS available"
        return torch.device("cpu"), "auto: no GPU available"
    if base == "cuda":
        if not cuda_ok:
            raise DeviceError("device 'cuda' requested but torch reports no CUDA device "
                             f"(torch {torch.__version__}, CUDA build: {torch.version.cuda is not None}); use --device cpu")
        dev = torch.device(req)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"device {req!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
        return dev, "requested"
    if base == "mps":
        if not mps_ok:
            raise DeviceError("device 'mps' requested but Apple MPS is not available; use --device cpu")
        return torch.device("mps"), "requested"
    return torch.device("cpu"), "requested"


def describe_devices() -> list[dict]:
    """Devices torch can use here: ``[{"kind", "device", "name", "memory_bytes"}]``, the CPU always last;
    ``device`` is the name :func:`resolve_device` takes for it (``cuda:0``, ``mps``, ``cpu``)."""
    import platform

    import torch

    devices = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            devices.append({"kind": "cuda", "device": f"cuda:{i}", "name": f"cuda:{i} {props.name}", "memory_bytes": int(props.total_memory)})
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        devices.append({"kind": "mps", "device": "mps", "name": "Apple MPS", "memory_bytes": None})
    devices.append({"kind": "cpu", "device": "cpu", "name": platform.processor() or platform.machine() or "cpu", "memory_bytes": None})
    return devices


def autocast_context(device):
    """Mixed precision on CUDA only (CPU autocast is slower for 3D convolutions and changes numerics)."""
    import contextlib

    import torch

    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()
