"""Checks the subcommands run on their arguments before any work starts, so that a bad path or
device costs the user one line at once instead of a traceback after the whole job."""
from __future__ import annotations

import os
from pathlib import Path


class UsageError(ValueError):
    """A bad command line: reported as one line, with exit status 2."""


def writable_file(path: str, option: str, suffix: str, what: str) -> Path:
    """`path` as a file the command may create or overwrite, named with `suffix`.
    `what` says what the option writes, for the message about a wrong suffix."""
    target = Path(path)
    if target.suffix.lower() != suffix:
        raise UsageError(f"{option} {path}: {option} writes {what}, so the file name must end "
                         f"in {suffix}")
    if target.is_dir():
        raise UsageError(f"{option} {path}: is a directory; give a file name ending in {suffix}")
    if target.exists():
        if not os.access(target, os.W_OK):
            raise UsageError(f"{option} {path}: the file exists and is not writable")
        return target
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"{option} {path}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {path}: the folder {parent} is not writable")
    return target


def writable_folder(path: str, option: str) -> Path:
    """`path` as a folder the command may create (with its parents) and write into."""
    target = Path(path)
    existing = target
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        problem = ("is not a folder" if existing == target
                   else f"cannot be created: {existing} is not a folder")
        raise UsageError(f"{option} {path}: {problem}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {path}: {existing} is not writable")
    return target


def readable_file(path: str, option: str) -> Path:
    target = Path(path)
    if not target.is_file():
        problem = "is a folder, not a file" if target.is_dir() else "does not exist"
        raise UsageError(f"{option} {path}: {problem}")
    if not os.access(target, os.R_OK):
        raise UsageError(f"{option} {path}: is not readable")
    return target


DEVICE_TYPES = ("cpu", "cuda")


def available_device(text: str | None):
    """torch.device for --device: `text` if this machine has it, the default (cuda when
    available, else cpu) for None."""
    import torch

    if text is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in DEVICE_TYPES:
        raise UsageError(f"--device {text}: unknown device; use cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = ("a CPU-only build" if torch.version.cuda is None
                     else f"built for CUDA {torch.version.cuda}, but it sees no GPU")
            raise UsageError(f"--device {text}: CUDA is not available (torch {torch.__version__} "
                             f"is {build}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {text}: there are {torch.cuda.device_count()} CUDA "
                             f"device(s), numbered from 0")
    return device
