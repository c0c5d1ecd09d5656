"""Pipeline parallelism for KunlunBaize on ``torch.distributed.pipelining``: GPipe, 1F1B and interleaved 1F1B.

:func:`build_pipeline` cuts the model into ``pp × stages_per_rank`` stages (:mod:`.pipeline_stages`; stage k runs on
pipeline rank k mod pp), wraps this rank's stages in ``PipelineStage`` and drives them with the chosen schedule.
:meth:`Pipeline.step` runs one batch forward and backward through every micro-batch: the last stage computes the joint
loss (eq. 22) of each micro-batch, weighted so that the sum over micro-batches, after the schedule's 1/n gradient
scaling, is exactly one process's mean over the whole batch; then the gradients of the parameters two stages share
(the embedding on the first and last stage, the dense-residual logits on every stage) are summed over their copies,
as for tied embeddings, so each copy holds the whole model's gradient and every copy steps identically.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

from ...model.loss import IGNORE_INDEX
from ...model.model import KunlunBaize
from .context import ContextGroup
from .pipeline_stages import (
    PipelineStageModule,
    build_stage_modules,
    set_shared_grads,
    shared_parameter_names,
    sum_local_shared_grads,
)

SCHEDULES = {"gpipe": "GPipe", "1f1b": "1F1B", "interleaved1f1b": "Interleaved1F1B"}
"""``--pp-schedule`` names → ``torch.distributed.pipelining`` schedule names."""
MULTI_STAGE = {"interleaved1f1b"}
MIN_TORCH = (2, 8)


def require_pipelining() -> None:
    """Fail clearly when this torch cannot run ``torch.distributed.pipelining`` on gloo (needs ≥ 2.8)."""
    version = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
    if version < MIN_TORCH:
        raise RuntimeError(f"pipeline parallelism needs torch >= {'.'.join(map(str, MIN_TORCH))} "
                           f"(torch.distributed.pipelining on gloo), found {torch.__version__}: upgrade torch")


def pp_group(group_or_mesh) -> dist.ProcessGroup:
    """The pipeline process group from a ``ProcessGroup`` or a ``DeviceMesh`` (1-D, or with a ``pp`` dimension)."""
    if isinstance(group_or_mesh, dist.ProcessGroup):
        return group_or_mesh
    names = getattr(group_or_mesh, "mesh_dim_names", None)
    if names is not None and "pp" in names:
        return group_or_mesh["pp"].get_group()
    if getattr(group_or_mesh, "ndim", None) == 1:
        return group_or_mesh.get_group()
    raise ValueError("give the pipeline a ProcessGroup, a 1-D DeviceMesh or a DeviceMesh with a 'pp' dimension")


def _schedule_class(name: str, stages_per_rank: int):
    key = name.lower().replace("-", "").replace("_", "")
    if key not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    if key not in MULTI_STAGE and stages_per_rank != 1:
        raise ValueError(f"schedule {name!r} runs one stage per rank, got stages_per_rank={stages_per_rank}: "
                         "use interleaved1f1b for several")
    from torch.distributed.pipelining.schedules import get_schedule_class

    return get_schedule_class(SCHEDULES[key]), key in MULTI_STAGE


class Pipeline:
    """This rank's stages of a pipelined KunlunBaize and the schedule that runs them (see :func:`build_pipeline`)."""

    def __init__(self, stages: list[PipelineStageModule], group: dist.ProcessGroup, schedule_name: str,
                 n_microbatches: int, device: torch.device, ignore_index: int = IGNORE_INDEX) -> None:
        self.stages, self.group, self.n_microbatches = stages, group, n_microbatches
        self.ignore_index = ignore_index
        self.config = stages[0].config
        self.n_stages = stages[0].spec.n_stages
        self.pp_rank, self.pp_size = dist.get_rank(group), dist.get_world_size(group)
        self._schedule_name, self._device = schedule_name, device
        self._schedules = {n_microbatches: self._schedule(schedule_name, device)}
        self._eval_schedules: dict[int, object] = {}
        self._totals: torch.Tensor | None = None
        """Each loss term's valid targets over the batch (None: every micro-batch's mean counts once)."""
        self._parts: list[torch.Tensor] = []

    @property
    def schedule(self):
        """The training schedule of the current micro-batch count."""
        return self._schedules[self.n_microbatches]

    def _schedule(self, name: str, device: torch.device):
        """The schedule over new ``PipelineStage`` wrappers of this rank's stage modules (``n_microbatches``)."""
        from torch.distributed.pipelining import PipelineStage

        cls, multi = _schedule_class(name, len(self.stages))
        wrapped = [PipelineStage(m, m.spec.index, self.n_stages, device, group=self.group) for m in self.stages]
        return cls(wrapped if multi else wrapped[0], n_microbatches=self.n_microbatches, loss_fn=self._loss,
                   scale_grads=True)

    # ------------------------------------------------------------------ what the trainer sees
    @property
    def has_first(self) -> bool:
        return any(m.spec.is_first for m in self.stages)

    @property
    def has_last(self) -> bool:
        return any(m.spec.is_last for m in self.stages)

    @property
    def modules(self) -> list[nn.Module]:
        """This rank's stage modules (for FSDP wrapping, checkpoints, ``train()``/``eval()``)."""
        return list(self.stages)

    def parameters(self) -> Iterator[nn.Parameter]:
        """Every parameter of this rank's stages, each once (the optimiser's)."""
        seen: set[int] = set()
        for m in self.stages:
            for p in m.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield p

    def named_parameters(self) -> Iterator[tuple[int, str, nn.Parameter]]:
        """(stage index, full-model name, parameter) for every parameter of this rank's stages."""
        for m in self.stages:
            for name, p in m.named_parameters():
                yield m.spec.index, name, p

    def set_tensor_parallel(self, tp: int) -> None:
        """Say that the stages run under the model's tensor-parallel plan over ``tp`` ranks (applied before they were
        cut): the residual stream is a sequence shard, and the loss comes from vocabulary-parallel logits (run the
        steps under ``loss_parallel``)."""
        for m in self.stages:
            m.seq_shards = tp

    def set_context_parallel(self, cp: ContextGroup) -> None:
        """Say that the stages run under the model's context-parallel plan over ``cp`` (applied before they were
        cut): each micro-batch's sequences enter whole, the first stage keeps this rank's part of them, the
        boundaries carry that part and the last stage's loss terms are the global means over the cp ranks."""
        for m in self.stages:
            m.context = cp

    # ------------------------------------------------------------------ one step
    def step(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
             n_microbatches: int | None = None, document_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Forward and backward of one batch [B, T] (``labels`` default to the ids, shifted inside) in
        ``n_microbatches`` (default: the pipeline's): accumulates the whole model's gradient of the batch's mean
        joint loss into this rank's parameters and returns [joint, main, MTP depth 1, …] (float32, the batch
        means) on every pipeline rank.

        ``document_ids`` [B, T] (packed documents, ``--doc-mask``; given on every pipeline rank) go to every stage
        with its micro-batch, each document computed as if alone. The loss is then the mean of the micro-batches'
        mean losses, as one process accumulating them computes it (:func:`..step.train_step`): the targets a
        document boundary removes differ between micro-batches."""
        self._use(self._schedules, self._schedule_name, n_microbatches)
        args, target, kwargs = self._prepare(input_ids, labels, document_ids)
        self.schedule.step(*args, target=target, return_outputs=False, **kwargs)
        self._sync_shared_grads()
        return self._batch_losses(input_ids.device)

    def _use(self, cache: dict[int, object], name: str, n_microbatches: int | None) -> object:
        """The schedule ``name`` of ``n_microbatches`` (default: the current count) from ``cache``, made when new (a
        batch ramp changes the count: one schedule per count)."""
        n = self.n_microbatches if n_microbatches is None else n_microbatches
        if n < 1:
            raise ValueError(f"n_microbatches must be at least 1, got {n}")
        self.n_microbatches = n
        if n not in cache:
            cache[n] = self._schedule(name, self._device)
        return cache[n]

    def evaluate(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                 n_microbatches: int | None = None, document_ids: torch.Tensor | None = None) -> torch.Tensor:
        """[joint, main, MTP depth 1, …] of one batch without gradients (forward only, in ``n_microbatches``), on
        every pipeline rank (``document_ids``: as in :meth:`step`)."""
        if len(self.stages) > 1 and self.pp_size == 1:
            raise ValueError("forward-only evaluation needs the stages on at least 2 pipeline ranks: torch's "
                             "interleaved schedules cannot evaluate with neighbouring stages on one rank")
        # its own stages: switching one schedule between modes trips torch 2.13; forward only, GPipe's order is
        # as good as any single-stage schedule's and takes any micro-batch count
        name = self._schedule_name if len(self.stages) > 1 else "gpipe"
        schedule = self._use(self._eval_schedules, name, n_microbatches)
        args, target, kwargs = self._prepare(input_ids, labels, document_ids)
        with torch.no_grad():
            schedule.eval(*args, target=target, **kwargs)
        return self._batch_losses(input_ids.device)

    def _prepare(self, input_ids: torch.Tensor, labels: torch.Tensor | None,
                 document_ids: torch.Tensor | None = None) -> tuple[tuple, torch.Tensor | None, dict]:
        """Checks the batch, counts its targets; the schedule's inputs (first stage), target (last stage: ids,
        labels and any document ids) and keyword inputs (every stage: the document ids)."""
        labels = input_ids if labels is None else labels
        if input_ids.dim() != 2 or labels.shape != input_ids.shape:
            raise ValueError(f"input_ids and labels must be [batch, seq] of one shape, got {tuple(input_ids.shape)} "
                             f"and {tuple(labels.shape)}")
        if document_ids is not None and document_ids.shape != input_ids.shape:
            raise ValueError(f"document_ids must have the shape of input_ids {tuple(input_ids.shape)}, got "
                             f"{tuple(document_ids.shape)}")
        if input_ids.shape[0] % self.n_microbatches:
            raise ValueError(f"batch of {input_ids.shape[0]} sequences does not split into {self.n_microbatches} "
                             "micro-batches: make the batch a multiple of the micro-batch count")
        self._totals = self._target_counts(labels) if document_ids is None else None
        self._parts = []
        args = (input_ids,) if self.has_first else ()
        rows = [input_ids, labels.to(input_ids.dtype)]
        if document_ids is not None:
            rows.append(document_ids.to(input_ids.device, input_ids.dtype))
        target = torch.stack(rows, dim=1) if self.has_last else None
        return args, target, {} if document_ids is None else {"document_ids": document_ids}

    def _batch_losses(self, device: torch.device) -> torch.Tensor:
        """The batch's loss terms from the last stage's micro-batches, on every pipeline rank."""
        sums = torch.zeros(2 + self.config.mtp_depth, dtype=torch.float32, device=device)
        if self.has_last:  # the micro-batches' calls are the last ones (the first step's shape inference calls too)
            sums += torch.stack(self._parts[-self.n_microbatches:]).sum(0).to(device) / self.n_microbatches
        dist.all_reduce(sums, group=self.group)  # only the last stage's rank holds non-zero sums
        return sums

    def _target_counts(self, labels: torch.Tensor) -> torch.Tensor:
        """Valid targets of each loss term (main: shift 1, depth j: shift j + 1) over the whole batch."""
        shifts = range(1, self.config.mtp_depth + 2)
        return torch.stack([(labels[:, s:] != self.ignore_index).sum() for s in shifts]).float()

    def _loss(self, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """One micro-batch's share of the batch's joint loss, times the micro-batch count (the schedule divides
        the gradients by it): term t weighted by this micro-batch's valid targets over the batch's (packed
        documents: by 1, each micro-batch's mean counts once)."""
        stage = next(m for m in self.stages if m.spec.is_last)
        ids, labels = target[:, 0], target[:, 1]
        documents = target[:, 2] if target.shape[1] > 2 else None
        terms = stage.loss_terms(hidden, ids, labels, self.ignore_index, documents)
        values = [_local(t) for t in (terms.main, *terms.mtp)]  # loss_parallel's are replicated DTensors
        if self._totals is None:  # packed documents: every micro-batch's mean counts once (see :meth:`step`)
            scale = torch.ones(len(values), device=hidden.device)
        else:
            counts = self._target_counts(labels).to(hidden.device)
            scale = torch.where(self._totals > 0, counts / self._totals.clamp(min=1), torch.zeros_like(counts))
            scale = scale * self.n_microbatches
        gammas = (1.0, *self.config.gammas)
        total = sum(g * s * v for g, s, v in zip(gammas, scale, values, strict=True))
        parts = torch.stack([total.detach().float(), *(s * v.detach().float() for s, v in zip(scale, values,
                                                                                               strict=True))])
        self._parts.append(parts)
        return total

    def _sync_shared_grads(self) -> None:
        """Sum the gradients of parameters held by several stages over every copy, on every rank holding one.

        Under FSDP2 the gradients are shards (DTensors); the copies on two pipeline ranks are sharded alike over
        the same data-parallel coordinates, so their local shards are summed."""
        shared = shared_parameter_names(self.config, self.n_stages)
        logits = [n for n in shared if n.startswith("dense.")]
        if logits:  # tiny: an all-reduce over the whole pipeline group
            grads = sum_local_shared_grads(self.stages, logits)
            local = [_local(g) for g in grads]
            flat = torch.cat([g.reshape(-1) for g in local])
            dist.all_reduce(flat, group=self.group)
            summed = [_like(g, part.view_as(lg)) for g, lg, part in
                      zip(grads, local, flat.split([g.numel() for g in local]), strict=True)]
            set_shared_grads(self.stages, logits, summed)
        if "embed.weight" in shared:
            self._sync_pair("embed.weight", [self._rank_of(s) for s in shared["embed.weight"]])

    def _rank_of(self, stage: int) -> int:
        return stage % self.pp_size

    def _sync_pair(self, name: str, ranks: list[int]) -> None:
        """Sum one parameter's gradient between the two pipeline ranks holding it (exchanged, then added)."""
        (grad,) = sum_local_shared_grads(self.stages, [name])
        if grad is None:
            return
        peers = sorted(set(ranks) - {self.pp_rank})
        if peers:
            (peer,) = peers
            mine = _local(grad).contiguous()
            other = torch.empty_like(mine)
            ops = [dist.P2POp(dist.isend, mine, group=self.group, group_peer=peer),
                   dist.P2POp(dist.irecv, other, group=self.group, group_peer=peer)]
            for req in dist.batch_isend_irecv(ops):
                req.wait()
            grad = _like(grad, mine + other if self.pp_rank < peer else other + mine)  # one order on both ranks
        set_shared_grads(self.stages, [name], [grad])

    # ------------------------------------------------------------------ gradient clipping over the pipeline
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip the whole model's gradient to ``max_norm`` (each shared parameter counted once, on its first
        stage); returns the total norm before clipping, the same on every pipeline rank. Sharded (DTensor)
        gradients count each element once over their mesh (FSDP2 shards, tensor-parallel shards, replicas)."""
        shared = shared_parameter_names(self.config, self.n_stages)
        counted = [p.grad for index, name, p in self.named_parameters()
                   if p.grad is not None and (name not in shared or shared[name][0] == index)]
        sq = torch.zeros((), dtype=torch.float32, device=self._device)
        if counted:
            norm = torch.nn.utils.get_total_norm(counted, 2.0)
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
            sq = norm.float().pow(2).to(self._device)
        dist.all_reduce(sq, group=self.group)
        norm = sq.sqrt()
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)  # torch's clip_grad_norm_ coefficient
        for p in self.parameters():
            if p.grad is not None:
                local = _local(p.grad)
                local.mul_(coef.to(local.device, local.dtype))
        return norm


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (a plain tensor as it is)."""
    return t.to_local() if hasattr(t, "to_local") else t


def _like(template: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """``local`` as a part of a tensor laid out like ``template`` (a DTensor of the same mesh and placements)."""
    if not hasattr(template, "to_local"):
        return local
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local, template.device_mesh, template.placements, run_check=False,
                              shape=template.shape, stride=template.stride())


def build_pipeline(model: KunlunBaize, group_or_mesh, schedule_name: str = "1f1b", n_microbatches: int = 2,
                   stages_per_rank: int = 1, layers_per_stage: list[int] | None = None,
                   device: torch.device | str | None = None) -> Pipeline:
    """This rank's part of ``model`` pipelined over ``group_or_mesh`` (a ProcessGroup, or a DeviceMesh with a
    ``pp`` dimension) under ``schedule_name`` (gpipe, 1f1b, interleaved1f1b) with ``n_microbatches`` per step.

    The trunk is cut into pp × ``stages_per_rank`` stages (even, or ``layers_per_stage``); stage k runs on pipeline
    rank k mod pp. The stage modules share the model's blocks (copies of the shared parameters aside); the rest of
    ``model`` may be dropped afterwards.
    """
    require_pipelining()
    group = pp_group(group_or_mesh)
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    if n_microbatches < 1:
        raise ValueError(f"n_microbatches must be at least 1, got {n_microbatches}")
    if stages_per_rank < 1:
        raise ValueError(f"stages_per_rank must be at least 1, got {stages_per_rank}")
    _schedule_class(schedule_name, stages_per_rank)  # refuse a bad name or stage count before cutting
    n_stages = size * stages_per_rank
    mine = [k for k in range(n_stages) if k % size == rank]
    stages = build_stage_modules(model, n_stages, layers_per_stage, mine)
    device = torch.device(device) if device is not None else model.embed.weight.device
    return Pipeline(stages, group, schedule_name, n_microbatches, device)
