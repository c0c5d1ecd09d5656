"""Run one task on a loaded checkpoint: batched scoring or generation, per-sample records, resume, metrics.

A task's folder holds ``task.json`` (what decides its results: checkpoint hash, settings, data digest),
``records.jsonl`` (one line per sample, appended a batch at a time and synced) and ``summary.json``. A killed run
started again with the same settings skips the problems whose records are complete.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..data.tokenizer import CHAT_TOKENS
from ..infer.sampling import SamplingParams
from ..progress import Progress
from .model import EvalModel
from .position_loss import PositionLossRun
from .records import Log, Records, _stderr, _write_json, records_digest, row, training_data
from .ruler_run import RulerRun
from .scoring import exact_match, extract_answer, has_math_verify, math_equal
from .tasks import Task, TaskError, mc_context, render_prompt, shots

CHAT_END = CHAT_TOKENS[-1]  # <|end|>: ends a turn of the chat template (kunlunbaize.posttrain.chat)

class TaskRunner:
    """Evaluates ``task`` on ``model`` into ``folder``; :meth:`run` returns the task's summary."""

    def __init__(self, model: EvalModel, task: Task, folder: Path, *, checkpoint_hash: str, batch_size: int = 16,
                 limit: int | None = None, seed: int = 0, chat_template: str | None = None, fresh: bool = False,
                 progress: bool = True, workers: int | None = None, timeout: float = 10.0,
                 data: str | Path | None = None, log: Log = _stderr) -> None:
        self.model, self.task, self.folder = model, task, Path(folder)
        self.batch_size, self.seed, self.chat_template = batch_size, seed, chat_template
        self.fresh, self.progress, self.workers, self.timeout, self.data, self.log = (
            fresh, progress, workers, timeout, data, log)
        self.limit = limit
        self.count = len(task.records) if limit is None else min(limit, len(task.records))
        self.fingerprint = {"checkpoint_hash": checkpoint_hash, "settings": task.settings(), "seed": seed,
                            "records": records_digest(task.records),
                            "chat_template": (hashlib.sha256(chat_template.encode()).hexdigest()
                                              if chat_template else None)}

    def run(self) -> dict[str, Any]:
        kind = self.task.kind
        if kind == "bpb":
            rows, extra = self._bpb()
        elif kind == "ruler":
            rows, extra = RulerRun(self).run()
        elif kind == "position-loss":
            rows, extra = PositionLossRun(self).run()
        else:
            per_unit = 1 if kind in ("mc", "gen") else self.task.samples
            self.records = Records(self.folder, self.fingerprint, per_unit, self.fresh)
            {"mc": self._mc, "gen": self._generate, "math-avg": self._generate, "code": self._generate}[kind]()
            done = [self.records.done[i] for i in range(self.count)]
            rows, extra = {"mc": self._score_mc, "gen": self._score_gen, "math-avg": self._score_avg,
                           "code": self._score_code}[kind](done)
        summary = {"task": self.task.name, "kind": kind, "source": self.task.source, "problems": self.count,
                   "settings": self.task.settings(), "seed": self.seed, "rows": rows, **extra}
        _write_json(self.folder / "summary.json", summary)
        return summary

    # ------------------------------------------------------------------------------------- batching
    def _todo_batches(self, per_row: int) -> Iterator[list[int]]:
        """Problem indices not yet done, in fixed batches of ``batch_size // per_row`` problems (fixed by index,
        so a resumed run samples each batch as an uninterrupted one would)."""
        size = max(1, self.batch_size // per_row)
        for start in range(0, self.count, size):
            todo = [i for i in range(start, min(start + size, self.count)) if i not in self.records.done]
            if todo:
                yield todo

    def _bar(self) -> Progress:
        return Progress(self.count, initial=sum(1 for i in range(self.count) if i in self.records.done),
                        desc=self.task.name, unit="problem", enabled=self.progress)

    def _prompt(self, index: int, text: str) -> str:
        return render_prompt(text, shots(self.task, index, self.seed), self.chat_template)

    # ------------------------------------------------------------------------------- multiple choice
    def _mc(self) -> None:
        model, task = self.model, self.task
        with self._bar() as bar:
            for batch in self._todo_batches(max(len(r["choices"]) for r in task.records[:self.count])):
                pairs, lines = [], []
                for i in batch:
                    rec = task.records[i]
                    context = self._prompt(i, mc_context(rec))
                    pairs += [model.encode_pair(context, " " + c) for c in rec["choices"]]
                    lines.append({"index": i, "id": rec.get("id", i), "prompt": context, "choices": rec["choices"],
                                  "answer": rec["answer"]})
                lls = model.loglikelihoods(pairs)
                at = 0
                for line in lines:
                    k = len(line["choices"])
                    ll, at = lls[at:at + k], at + k
                    norm = [v / len(c) for v, c in zip(ll, line["choices"], strict=True)]  # lm-eval's acc_norm
                    pred, pred_norm = _argmax(ll), _argmax(norm)
                    line.update(loglik=ll, pred=pred, pred_norm=pred_norm, acc=float(pred == line["answer"]),
                                acc_norm=float(pred_norm == line["answer"]))
                self.records.add(lines)
                bar.update(len(batch))

    def _score_mc(self, done: list[list[dict]]) -> tuple[list[dict], dict]:
        lines = [d[0] for d in done]
        return [row(self.task, "acc", [ln["acc"] for ln in lines], len(lines)),
                row(self.task, "acc_norm", [ln["acc_norm"] for ln in lines], len(lines))], {}

    # ------------------------------------------------------------------------------------ generation
    def _budget(self, prompts: list[str]) -> int:
        """max new tokens for every problem of the task (one number, so batched equals one at a time), clipped
        to the room the longest prompt leaves in the context, with a warning."""
        want, context = self.task.max_new_tokens, self.model.context
        longest = max(len(self.model.encode(p)) for p in prompts)
        room = context - longest
        if room < 1:
            budget = min(want, context // 2)
            self.log(f"warning: {self.task.name}: the longest prompt has {longest} tokens, more than the context of "
                     f"{context}; long prompts keep their last {context - budget} tokens and generate at most {budget}")
            return budget
        if want > room:
            self.log(f"warning: {self.task.name}: max new tokens {want} clipped to {room}: the context holds "
                     f"{context} tokens and the longest prompt takes {longest}")
        return min(want, room)

    def _generate(self) -> None:
        task, n = self.task, self.task.samples
        texts = [r["prompt"] for r in task.records[:self.count]]
        prompts = [self._prompt(i, t) for i, t in enumerate(texts)]
        budget = self._budget(prompts)
        sampling = SamplingParams(temperature=task.temperature, top_p=task.top_p)
        # through the chat template a reply ends with the end-of-turn token (decoded as text, special tokens kept)
        stop = (*task.stop, CHAT_END) if self.chat_template else task.stop
        with self._bar() as bar:
            for batch in self._todo_batches(n):
                rows = [i for i in batch for _ in range(n)]
                seed = self.seed * 1_000_003 + batch[0] if task.temperature > 0 else None
                outs = self.model.generate([prompts[i] for i in rows], budget, sampling, seed, stop)
                lines = []
                for j, (i, out) in enumerate(zip(rows, outs, strict=True)):
                    rec = task.records[i]
                    line = {"index": i, "sample": j % n, "id": rec.get("id", rec.get("task_id", i)),
                            "prompt": prompts[i], "output": out.text, "tokens": out.tokens,
                            "finish_reason": out.finish_reason}
                    lines.append(line)
                if task.kind == "code":
                    self._run_code(lines)
                else:
                    for line in lines:
                        self._check_answer(line, str(task.records[line["index"]]["answer"]))
                self.records.add(lines)
                bar.update(len(batch))

    def _check_answer(self, line: dict[str, Any], gold: str) -> None:
        pred = extract_answer(line["output"])
        line.update(answer=gold, extracted=pred, exact_match=float(exact_match(pred, gold)))
        if has_math_verify():
            line["math_equal"] = float(exact_match(pred, gold) or math_equal(gold, pred))
        check = "math_equal" if self.task.check == "math" and "math_equal" in line else "exact_match"
        line["correct"] = line[check]

    def _run_code(self, lines: list[dict[str, Any]]) -> None:
        from .sandbox import humaneval_check, judge_all

        problems = [self.task.records[ln["index"]] for ln in lines]
        checks = [humaneval_check(p, ln["output"]) for p, ln in zip(problems, lines, strict=True)]
        results = judge_all(checks, workers=self.workers, timeout=self.timeout)
        for line, res in zip(lines, results, strict=True):
            line.update(status=res.status, correct=float(res.passed), isolation=res.isolation,
                        error=res.stderr.strip().splitlines()[-1][:300] if res.stderr.strip() else "")

    def _score_gen(self, done: list[list[dict]]) -> tuple[list[dict], dict]:
        lines = [d[0] for d in done]
        rows = [row(self.task, "exact_match", [ln["exact_match"] for ln in lines], len(lines))]
        if lines and all("math_equal" in ln for ln in lines):
            rows.append(row(self.task, "math_equal", [ln["math_equal"] for ln in lines], len(lines)))
        return rows, {"check": self.task.check}

    def _score_avg(self, done: list[list[dict]]) -> tuple[list[dict], dict]:
        """pass@1 averaged over the samples: per problem, the fraction of its samples that are right."""
        per_problem = [sum(s["correct"] for s in d) / len(d) for d in done]
        return [row(self.task, f"pass@1 (avg of {self.task.samples})", per_problem, len(done))], {
            "check": "math_equal" if done and "math_equal" in done[0][0] and self.task.check == "math"
            else "exact_match"}

    def _score_code(self, done: list[list[dict]]) -> tuple[list[dict], dict]:
        from .sandbox import pass_at_k

        n = self.task.samples
        rows = []
        for k in self.task.ks:
            per_problem = [pass_at_k(n, int(sum(s["correct"] for s in d)), k) for d in done]
            rows.append(row(self.task, f"pass@{k}", per_problem, len(done)))
        isolation = sorted({s.get("isolation", "") for d in done for s in d})
        return rows, {"isolation": isolation}

    # ------------------------------------------------------------------------------------------- bpb
    def _bpb(self) -> tuple[list[dict], dict]:
        from .bpb import bpb_of_split

        data = self.task.source or self.data or training_data(self.model.checkpoint)
        if not data:
            raise TaskError("the bpb task needs held-out text: --data DIR (a `kunlun prepare` folder), or bpb=DIR; "
                            f"the data {self.model.checkpoint} was trained on is not recorded in it")
        self.folder.mkdir(parents=True, exist_ok=True)
        result = bpb_of_split(self.model, self.model.checkpoint, self.model.tokenizer, self.model.context, data,
                              self.task.split, max_tokens=self.task.max_tokens, batch_size=self.batch_size,
                              progress=self.progress)
        rows = [row(self.task, "bpb", result["bpb"], result["tokens"]),
                row(self.task, "perplexity", result["perplexity"], result["tokens"])]
        return rows, {"bpb": result}


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)
