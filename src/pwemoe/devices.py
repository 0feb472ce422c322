"""Where a run computes and in which precision: `device` and `precision` settings resolved to torch objects.

Knows torch and the launcher's environment (LOCAL_RANK), nothing of models or configs, so every
layer above may use it. Placement itself (which tensors go where) is the workbench's business.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
from collections.abc import Iterator

import torch

DEVICE_CHOICES = "auto | cpu | cuda | cuda:N"
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_DEVICE = re.compile(r"auto|cpu|cuda|cuda:[0-9]+")  # matched whole (fullmatch)


def check_device_spec(spec: str) -> str | None:
    """None when `spec` is a well-formed device setting, else what is wrong (no hardware is probed)."""
    if not isinstance(spec, str) or not _DEVICE.fullmatch(spec):
        return f"must be {DEVICE_CHOICES}, got {spec!r}"
    return None


def local_rank() -> int:
    """This process's rank on its node under `accelerate launch` / `torchrun` (0 when not launched)."""
    try:
        return int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        return 0


def local_world_size() -> int:
    """Processes launched on this node by `accelerate launch` / `torchrun` (1 when not launched)."""
    try:
        return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    except ValueError:
        return 1


def in_process_group() -> bool:
    """Whether this process belongs to an initialised torch.distributed process group."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def join_launch(device: str) -> None:
    """Join the process group when started by `accelerate launch` / `torchrun` (alone: nothing happens).

    device: the run's `device` setting. A run on the CPU (`cpu`, or any setting on a machine without CUDA) joins
    with gloo, even where CUDA is available (NCCL cannot reduce CPU tensors); a GPU run with NCCL.

    accelerate's PartialState does the joining; synchronise with `wait_for_everyone` below, not with
    PartialState's own, which is silently a no-op when accelerate typed the launch differently (an `auto`
    device on a CPU-only machine). The group is destroyed when the interpreter exits, before its finalisation:
    left to it, a gloo worker thread still holding a tensor aborts the process (SIGABRT, "terminate called
    without an active exception"), and the launcher then kills the other ranks.
    """
    from accelerate import PartialState

    PartialState(cpu=device == "cpu" or not torch.cuda.is_available())
    global _DESTROY_AT_EXIT
    if not _DESTROY_AT_EXIT and in_process_group():
        atexit.register(_destroy_process_group)
        _DESTROY_AT_EXIT = True


_DESTROY_AT_EXIT = False


def _destroy_process_group() -> None:
    if in_process_group():
        torch.distributed.destroy_process_group()


def wait_for_everyone() -> None:
    """Block until every rank of the process group is here (nothing without a group)."""
    if not in_process_group():
        return
    if torch.distributed.get_backend() == "nccl":  # NCCL's barrier must know this rank's GPU
        torch.distributed.barrier(device_ids=[torch.cuda.current_device()])
    else:
        torch.distributed.barrier()


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group; (0, 1) without one."""
    if in_process_group():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def resolve_device(spec: str = "auto", key: str = "device") -> torch.device:
    """The torch.device a `device` setting names on this machine and rank.

    auto: the local rank's GPU when CUDA is available, else the CPU. cuda: the local rank's GPU
    (each launched process takes its own). cuda:N: that GPU. A GPU that is not there is an error
    naming the setting, raised before any model is loaded.
    """
    why = check_device_spec(spec)
    if why:
        raise ValueError(f"{key}: {why}")
    if spec == "cpu":
        return torch.device("cpu")
    procs = local_world_size()
    if spec.startswith("cuda:") and procs > 1:  # every process would take the same GPU
        raise ValueError(
            f"{key}: {spec!r} names one GPU, but {procs} processes were launched on this node; set "
            f"{key}=cuda (each process takes its local rank's GPU) or launch one process"
        )
    available = torch.cuda.is_available()
    if spec == "auto" and not available:
        return torch.device("cpu")
    if not available:
        raise ValueError(
            f"{key}: {spec!r} requested but CUDA is not available here (torch {torch.__version__}, "
            f"built for CUDA {torch.version.cuda or 'none'}); set {key}=cpu or {key}=auto"
        )
    n = torch.cuda.device_count()
    index = local_rank() if spec in ("auto", "cuda") else int(spec.split(":")[1])
    if index >= n:
        what = f"local rank {index}" if spec in ("auto", "cuda") else spec
        raise ValueError(
            f"{key}: {what} needs GPU {index}, but only {n} GPU(s) are visible; launch at most {n} "
            f"processes per node, or pick cuda:0..cuda:{n - 1}"
        )
    return torch.device("cuda", index)


# What train.gradient_checkpointing may recompute (pwemoe.recompute.gradient_checkpointing): every transformer
# layer, or only the upcycled modules.
CHECKPOINT_SCOPES = ("layers", "upcycled")


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast for the forward in `precision` (fp32: a no-op). Parameters keep their own dtype."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextlib.contextmanager
def full_precision(device_type: str) -> Iterator[None]:
    """Switch autocast off (the merge theta_0 + sum lambda_i tau_i is summed in the weights' dtype)."""
    with torch.autocast(device_type=device_type, enabled=False):
        yield


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """Dynamic loss scaling for fp16 (its 5-bit exponent underflows small gradients); disabled otherwise."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def native_bf16(device: torch.device) -> str | None:
    """The instruction set that computes bf16 natively on `device`, or None (bf16 would then be emulated and
    slower than fp32): a GPU of compute capability 8 or newer; on a CPU, AMX-BF16 or AVX512-BF16 (x86) or the
    Arm BF16 extension, as /proc/cpuinfo lists them (Linux)."""
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        return f"CUDA compute capability {major}.x" if major >= 8 else None
    if device.type != "cpu":
        return None
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return None
    flags = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags |= set(line.split(":", 1)[1].split())
    for flag, name in (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16"), ("bf16", "Arm BF16")):
        if flag in flags:
            return name
    return None


# The environment variables that pick the CPU's kernels, and so the last bits of every result (a hypervolume's
# digits after 100 optimizer steps): oneDNN's instruction set (bf16 matmuls), ATen's vectorised kernels (softmax,
# activations), MKL's code path (fp32 GEMMs; MKL_CBWR=COMPATIBLE: the same on any x86 CPU, slower) and the threads
# (parallel reductions). docs/guides/gpus.md, "Numerics differ between CPUs".
NUMERICS_ENV = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR", "OMP_NUM_THREADS")


def cpu_name() -> str:
    """The CPU's model name as the OS reports it (/proc/cpuinfo on Linux), else the platform's word for it."""
    import platform

    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def numerics_description(device: torch.device) -> str:
    """One line naming what decides the last bits of results on `device`: the device (a CPU's model name), the
    instruction set that computes bf16 natively, ATen's kernel level, the threads, and any NUMERICS_ENV set."""
    bf16 = native_bf16(device) or "none"
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (native bf16: {bf16})"
    kernels = torch.backends.cpu.get_cpu_capability()
    env = ", ".join(f"{k}={os.environ[k]}" for k in NUMERICS_ENV if os.environ.get(k))
    n = torch.get_num_threads()
    return f"{cpu_name()} (native bf16: {bf16}; ATen kernels {kernels}; {n} thread{'s' * (n != 1)}" + (
        f"; {env})" if env else ")"
    )


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def move(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A batch of tensors on `device`; pinned host memory copies asynchronously."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


__all__ = [
    "DEVICE_CHOICES",
    "NUMERICS_ENV",
    "PRECISIONS",
    "autocast",
    "check_device_spec",
    "cpu_name",
    "full_precision",
    "grad_scaler",
    "local_rank",
    "move",
    "native_bf16",
    "numerics_description",
    "rank_and_world",
    "resolve_device",
    "synchronize",
]
