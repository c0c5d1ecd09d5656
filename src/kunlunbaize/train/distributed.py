"""Process group setup and the collectives the loop needs (the mesh and the model's wrapping: :mod:`.parallel`).

Under ``torchrun`` the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR …) selects the
distributed path; the backend is NCCL on GPUs and gloo on CPUs.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistEnv:
    """Join the process group if launched by torchrun; pick the device for this rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("kunlun train: --device cuda was asked for but no GPU is available")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", device_id=dev
                                if dev.type == "cuda" else None)
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def gradient_sync(model: nn.Module, sync: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on micro-steps that only accumulate (DDP ``no_sync`` / FSDP2 flag)."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(sync)
        yield
    elif hasattr(model, "no_sync") and not sync:  # DDP
        with model.no_sync():
            yield
    else:
        yield


def all_reduce_mean(values: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.distributed:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= env.world_size
    return values


def any_rank(env: DistEnv, flag: bool) -> bool:
    """Whether ``flag`` is set on any rank (every rank gets the same answer)."""
    if not env.distributed:
        return flag
    value = torch.tensor([float(flag)], device=env.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """Peak FLOP/s of one device for MFU, with how it was obtained (override with --peak-tflops)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        table = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "4090": 165e12}
        for key, bf16 in table.items():
            if key in name:
                peak = bf16 if dtype in (torch.bfloat16, torch.float16) else bf16 / 2  # TF32 ≈ half of bf16
                return peak, f"{name} dense {'bf16' if peak == bf16 else 'tf32'} datasheet"
        return float("nan"), f"{name}: unknown peak, pass --peak-tflops"
    cores = os.cpu_count() or 1
    flags = ""
    ghz = 2.5
    with contextlib.suppress(OSError):
        text = Path("/proc/cpuinfo").read_text()
        flags = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
        mhz = [float(ln.split(":")[1]) for ln in text.splitlines() if ln.startswith("cpu MHz")]
        if mhz:
            ghz = max(mhz) / 1000
    per_cycle = 64 if "avx512f" in flags else 32 if "fma" in flags else 8  # fp32 FLOPs/cycle/core
    threads = min(cores, torch.get_num_threads())
    return threads * per_cycle * ghz * 1e9, f"{threads} cores x {per_cycle} fp32 FLOP/cycle x {ghz:.2f} GHz"
