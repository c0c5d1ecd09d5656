"""``kunlun plan``: how to lay a training job out on N GPUs — memory per GPU, communication per step, pipeline bubble,
step time, MFU and days to the paper's token budget for every dp_replicate × dp_shard × tp × pp × cp layout, and
the fastest that fits.

Pure arithmetic on the model config and the architecture spec (its ``training_flops``): no torch, instant at any
size. ``calibration`` holds the published runs it is checked against.
"""

from __future__ import annotations

from .boundary import boundary_tensors
from .comm import DIMENSIONS, Traffic, traffic
from .estimate import PAPER_TOKENS, Estimate, estimate
from .hardware import GPU, GPUS, get_gpu
from .layout import AC_MODES, PRECISIONS, SCHEDULES, Job, Layout, layout_problems, mesh_problems
from .memory import Memory, rank_memory
from .search import Plan, plan
from .shape import Shape, shape_of

__all__ = ["AC_MODES", "DIMENSIONS", "GPU", "GPUS", "PAPER_TOKENS", "PRECISIONS", "SCHEDULES", "Estimate", "Job",
           "Layout", "Memory", "Plan", "Shape", "Traffic", "boundary_tensors", "estimate", "get_gpu",
           "layout_problems", "mesh_problems", "plan", "rank_memory", "shape_of", "traffic"]
