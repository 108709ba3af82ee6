"""Process-group set-up for programs started by torchrun, with a timeout, so that a rank that
fails or stalls turns into an error on the others instead of a hang."""
from __future__ import annotations

import datetime
import os
from typing import Optional

import torch
import torch.distributed as dist


def init_from_env(backend: Optional[str] = None, timeout_s: float = 120.0) -> torch.device:
    """Initialises the default process group from torchrun's environment (RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and returns this rank's device. backend: "nccl" when
    CUDA is available, else "gloo". Every collective waits at most `timeout_s` seconds: gloo
    raises; NCCL's watchdog aborts the process group (and by default the process)."""
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    if backend != "nccl":
        dist.init_process_group(backend, timeout=timeout)
        return torch.device("cpu")
    # NVLink multicast (NVLS) stays off unless the caller's environment says otherwise.
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)
    # Naming the device binds the communicator to it (NCCL would otherwise guess from the rank).
    dist.init_process_group(backend, timeout=timeout, device_id=device)
    return device
