"""The accelerators the planner knows: dense peak FLOP/s, memory and link bandwidths per GPU.

Peaks are dense (no 2:4 sparsity), for the SXM boards of an 8-GPU HGX/DGX node. Bandwidths are per GPU and per
direction: NVLink inside a node, the GPU's own network adapter (InfiniBand/RoCE) between nodes.
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 1e9
MiB = 2**20
TFLOPS = 1e12


@dataclass(frozen=True)
class GPU:
    """One accelerator model as the planner sees it."""

    name: str
    bf16_flops: float  # dense bf16 tensor-core peak, FLOP/s
    fp8_flops: float  # dense fp8 tensor-core peak, FLOP/s (= bf16 where there is no fp8)
    memory: float  # HBM, bytes (the total nvidia-smi reports)
    nvlink: float  # NVLink bandwidth per GPU per direction inside a node, bytes/s
    network: float  # network bandwidth per GPU per direction between nodes, bytes/s
    gpus_per_node: int = 8

    def peak(self, precision: str) -> float:
        """The dense peak of the linear layers' matmuls at ``precision`` (fp8: the fp8 peak; otherwise bf16's)."""
        return self.fp8_flops if precision == "fp8" else self.bf16_flops


GPUS: dict[str, GPU] = {gpu.name: gpu for gpu in (
    # NVIDIA A100 datasheet (SXM4 80GB): BF16 tensor core 312 TFLOPS dense; 80 GB HBM2e; NVLink 3 600 GB/s
    # (both directions); DGX A100: one 200 Gb/s HDR InfiniBand adapter per GPU. No fp8.
    GPU("A100", 312 * TFLOPS, 312 * TFLOPS, 81920 * MiB, 300 * GB, 25 * GB),
    # NVIDIA H100 datasheet (SXM5): BF16 1,979 TFLOPS and FP8 3,958 TFLOPS *with sparsity*, i.e. 989.4 and
    # 1,978.9 dense; 80 GB HBM3; NVLink 4 900 GB/s (both directions); DGX H100: 8× ConnectX-7 400 Gb/s NDR.
    GPU("H100", 989.4 * TFLOPS, 1978.9 * TFLOPS, 81559 * MiB, 450 * GB, 50 * GB),
    # NVIDIA H200 datasheet (SXM): the H100's tensor cores (989 / 1,979 TFLOPS dense); 141 GB HBM3e;
    # NVLink 900 GB/s; HGX H200 nodes: 400 Gb/s per GPU.
    GPU("H200", 989.4 * TFLOPS, 1978.9 * TFLOPS, 143771 * MiB, 450 * GB, 50 * GB),
    # NVIDIA DGX B200 datasheet: 72 PFLOPS FP8 training for 8 GPUs = 9 PFLOPS sparse, 4.5 dense per GPU; BF16
    # 2.25 PFLOPS dense; 1,440 GB HBM3e for 8 GPUs (180 GB each); NVLink 5 1.8 TB/s (both directions);
    # 8× ConnectX-7 400 Gb/s.
    GPU("B200", 2250 * TFLOPS, 4500 * TFLOPS, 183359 * MiB, 900 * GB, 50 * GB),
)}


def get_gpu(name: str) -> GPU:
    """The GPU called ``name`` (case-insensitive); ValueError naming the known ones otherwise."""
    for key, gpu in GPUS.items():
        if key.lower() == name.strip().lower():
            return gpu
    raise ValueError(f"unknown GPU type {name!r}: one of {', '.join(GPUS)}")
