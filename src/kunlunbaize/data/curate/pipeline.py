"""The datatrove stages of ``kunlun curate`` and the executors that run them (local, Slurm, Ray).

Stages, each a datatrove pipeline with its own logging folder (whose completion markers make a killed run resume
where it stopped):

1. ``filter``  read → format fixes (ftfy, whitespace) → language → code rules → prose rules → JSONL
2. ``minhash-signatures``  word 5-gram MinHash signatures of the filtered documents
3. ``minhash-buckets``  candidate pairs per LSH bucket
4. ``minhash-clusters``  duplicate clusters (union-find); one document per cluster is kept
5. ``dedup``  the filtered documents minus the removed duplicates → JSONL

Every removed document is written, with its reason, under ``removed/<filter>/`` of the work folder.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datatrove.pipeline.dedup.minhash import (
    MinhashConfig,
    MinhashDedupBuckets,
    MinhashDedupCluster,
    MinhashDedupFilter,
    MinhashDedupSignature,
)
from datatrove.pipeline.filters import (
    C4QualityFilter,
    FineWebQualityFilter,
    GopherQualityFilter,
    GopherRepetitionFilter,
)
from datatrove.pipeline.formatters import FTFYFormatter
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter

from ..format import DataError
from .lsh import lsh_params
from .slurm import env_command
from .steps import (
    AlphaWordsFilter,
    CodeQualityFilter,
    LanguageTagger,
    NotEmpty,
    ProseOnly,
    Source,
    SourceReader,
    WhitespaceFormatter,
)

EXECUTORS = ("local", "slurm", "ray")
ENGLISH_RULES = ["en"]  # the Gopher, C4 and FineWeb rules and stop words are English ones
# removal folders in pipeline order (the report lists them so)
FILTERS = ("empty", "language", "code_quality", "gopher_repetition", "gopher_quality", "gopher_alpha", "c4", "fineweb",
           "repetition_other_languages", "near_duplicate")
STAGES = ("filter", "minhash-signatures", "minhash-buckets", "minhash-clusters", "dedup")


@dataclass
class ExecutorOptions:
    """How the stages run: ``kind`` local (``workers`` processes), slurm (``partition``, ``time`` per job, and any
    further ``SlurmPipelineExecutor`` keyword in ``extra``) or ray (an initialised or local Ray cluster)."""

    kind: str = "local"
    workers: int = 1
    partition: str | None = None
    time: str = "24:00:00"
    extra: dict[str, Any] = field(default_factory=dict)


def minhash_config(similarity: float) -> MinhashConfig:
    """datatrove's MinHash configuration for the duplicate threshold ``similarity`` (5-grams, 64-bit hashes)."""
    buckets, per_bucket = lsh_params(similarity)
    return MinhashConfig(n_grams=5, num_buckets=buckets, hashes_per_bucket=per_bucket)


def _removed(work: Path, name: str) -> JsonlWriter:
    return JsonlWriter(str(work / "removed" / name), output_filename="${rank}.jsonl.gz")


def filter_pipeline(work: Path, sources: list[Source], *, text_field: str, decode_errors: str,
                    languages: list[str] | None) -> list[Any]:
    """Stage 1: read, fix formatting, identify languages and apply the code and prose quality rules."""
    return [
        SourceReader(sources, text_field=text_field, decode_errors=decode_errors),
        FTFYFormatter(),
        WhitespaceFormatter(),
        NotEmpty(exclusion_writer=_removed(work, "empty")),
        LanguageTagger(languages, exclusion_writer=_removed(work, "language")),
        CodeQualityFilter(exclusion_writer=_removed(work, "code_quality")),
        ProseOnly(GopherRepetitionFilter(), only=ENGLISH_RULES, exclusion_writer=_removed(work, "gopher_repetition")),
        # Gopher's alphabetic-words rule on whitespace words, as the paper states it (see AlphaWordsFilter)
        ProseOnly(GopherQualityFilter(max_non_alpha_words_ratio=None), only=ENGLISH_RULES,
                  exclusion_writer=_removed(work, "gopher_quality")),
        ProseOnly(AlphaWordsFilter(), only=ENGLISH_RULES, exclusion_writer=_removed(work, "gopher_alpha")),
        ProseOnly(C4QualityFilter(filter_no_terminal_punct=False), only=ENGLISH_RULES,
                  exclusion_writer=_removed(work, "c4")),
        ProseOnly(FineWebQualityFilter(), only=ENGLISH_RULES, exclusion_writer=_removed(work, "fineweb")),
        # other languages: only the language-independent line and paragraph repetition rules
        ProseOnly(GopherRepetitionFilter(top_n_grams=(), dup_n_grams=()), exclude=ENGLISH_RULES,
                  name="repetition (other languages)", exclusion_writer=_removed(work, "repetition_other_languages")),
        JsonlWriter(str(work / "filtered"), output_filename="${rank}.jsonl.gz"),
    ]


def dedup_pipelines(work: Path, similarity: float) -> list[list[Any]]:
    """Stages 2-5: MinHash signatures, buckets, clusters, and the filtered documents minus the duplicates."""
    config = minhash_config(similarity)
    reader = JsonlReader(str(work / "filtered"), glob_pattern="*.jsonl.gz")
    mh = work / "minhash"
    return [
        [reader, MinhashDedupSignature(str(mh / "signatures"), config=config)],
        [MinhashDedupBuckets(str(mh / "signatures"), str(mh / "buckets"), config=config)],
        [MinhashDedupCluster(str(mh / "buckets"), str(mh / "remove"), config=config, save_cluster_id=True,
                             save_cluster_size=True)],
        [JsonlReader(str(work / "filtered"), glob_pattern="*.jsonl.gz"),
         MinhashDedupFilter(str(mh / "remove"), exclusion_writer=_removed(work, "near_duplicate"),
                            load_cluster_ids=True, load_cluster_sizes=True),
         JsonlWriter(str(work / "deduped"), output_filename="${rank}.jsonl.gz")],
    ]


def _executor_factory(options: ExecutorOptions) -> Callable[..., Any]:
    """A function (pipeline, tasks, logging_dir, depends) -> datatrove executor of ``options.kind``."""
    if options.kind == "local":
        from datatrove.executor import LocalPipelineExecutor

        return lambda pipeline, tasks, logs, depends: LocalPipelineExecutor(
            pipeline, tasks=tasks, workers=min(options.workers, tasks), logging_dir=logs, depends=depends)
    if options.kind == "slurm":
        from datatrove.executor import SlurmPipelineExecutor

        if not options.partition:
            raise DataError("--executor slurm needs --slurm-partition (the Slurm partition to submit the jobs to)")
        extra = {"env_command": env_command(), **options.extra}
        return lambda pipeline, tasks, logs, depends: SlurmPipelineExecutor(
            pipeline, tasks=tasks, time=options.time, partition=options.partition, logging_dir=logs,
            depends=depends, job_name=f"kunlun-curate-{Path(logs).name}", **extra)
    if options.kind == "ray":
        try:
            import ray

            from .ray_executor import RayExecutor
        except ImportError:
            raise DataError("--executor ray needs Ray: pip install 'kunlunbaize[curate]'") from None
        if not ray.is_initialized():
            ray.init()  # the cluster RAY_ADDRESS names, else a new local one
        # one Ray job per worker and stage: each job starts a Python that imports datatrove, spaCy and lingua
        return lambda pipeline, tasks, logs, depends: RayExecutor(
            pipeline, tasks=tasks, workers=options.workers, logging_dir=logs, depends=depends,
            tasks_per_job=-(-tasks // options.workers))
    raise DataError(f"--executor must be one of {', '.join(EXECUTORS)}, got {options.kind!r}")


def build_executors(work: Path, sources: list[Source], options: ExecutorOptions, *, tasks: int, similarity: float,
                    text_field: str, decode_errors: str, languages: list[str] | None) -> list[Any]:
    """The five stages' executors, each depending on the one before, logging under ``work/logs/<stage>``."""
    make = _executor_factory(options)
    pipelines = [filter_pipeline(work, sources, text_field=text_field, decode_errors=decode_errors,
                                 languages=languages), *dedup_pipelines(work, similarity)]
    buckets = minhash_config(similarity).num_buckets
    counts = [tasks, tasks, buckets, 1, tasks]
    executors: list[Any] = []
    for stage, pipeline, n in zip(STAGES, pipelines, counts, strict=True):
        executors.append(make(pipeline, n, str(work / "logs" / stage), executors[-1] if executors else None))
    return executors


def run_stages(executors: list[Any], kind: str) -> bool:
    """Run the stages; True when all are complete (a Slurm submission returns before they are). A stage left with
    failed tasks (Ray gives up on a task after three tries) stops the run before the next stage waits for it."""
    if kind == "slurm":
        executors[-1].run()  # submits every stage, chained by dependencies
        return all(not executor.get_incomplete_ranks() for executor in executors)
    for stage, executor in zip(STAGES, executors, strict=True):
        executor.run()
        if failed := executor.get_incomplete_ranks():
            raise DataError(f"curation stage {stage} left {len(failed)} of {executor.world_size} task(s) unfinished; "
                            f"see the logs under {executor.logging_dir.path}, fix the cause and rerun the same "
                            f"command to resume")
    return True
