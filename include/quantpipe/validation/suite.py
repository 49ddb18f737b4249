"""Which task sets a validation measures, and with what: the built-in sets, the user's own
lm-eval tasks and HumanEval with its sandbox, resolved once per stage for this worker.

A run that names no task sets gets its worker's suite (``assets.tasks.worker_suite``: the
whole suite on a GPU, the sets a CPU scores in minutes on a CPU) plus every task the user's
folder defines. The same settings on the same kind of worker always resolve to the same
suite, so baseline and candidate are measured alike (the baseline key holds ``key``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..assets.tasks import CODE_TASKS, builtin_tasks, worker_suite
from ..settings import EvalSettings
from .accuracy import CodeEval
from .user_tasks import read_answers, task_names

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskSuite:
    folders: tuple[Path, ...]  # the built-in sets' folder, then the user's (named by content hash)
    names: tuple[str, ...]
    limit: int
    chat_template: bool = False
    code: CodeEval | None = field(default=None, compare=False)
    # sets of the worker's default suite this host cannot measure, with the reason (never a pass)
    unavailable: dict[str, str] = field(default_factory=dict, compare=False)
    # the user's prompts with expected answers (answers.jsonl): they join the answer-flip prompts
    answers: tuple[dict, ...] = field(default=(), compare=False)

    @property
    def key(self) -> dict:
        return {"folders": [f.name for f in self.folders], "names": list(self.names), "limit": self.limit,
                "chat_template": self.chat_template, "answers": len(self.answers),
                "sandbox": self.code.limits.model_dump(mode="json", exclude={"hidden_paths"}) if self.code else None}


def build_suite(s: EvalSettings, device: str, cache_dir: Path, user_dir: Path | None = None,
                hidden_paths: tuple[Path, ...] = ()) -> TaskSuite | None:
    """The suite for settings ``s`` on a worker of kind ``device`` (None: task accuracy off).
    ``user_dir``: the user's staged task folder; ``hidden_paths``: what the sandbox hides."""
    answers = tuple(read_answers(user_dir)) if user_dir else ()
    if s.task_limit == 0:  # no task sets; the user's answers are still asked
        return TaskSuite(folders=(user_dir,), names=(), limit=0, answers=answers) if answers else None
    user = tuple(task_names(user_dir)) if user_dir else ()
    explicit = bool(s.tasks)
    names = tuple(dict.fromkeys(s.tasks if explicit else (*worker_suite(device), *user)))
    code, unavailable = None, {}
    if any(n in CODE_TASKS for n in names):
        from .humaneval import load_problems
        from .sandbox import SandboxLimits, sandbox_available

        limits = SandboxLimits(hidden_paths=tuple(p.resolve() for p in hidden_paths))
        if explicit or sandbox_available(limits) is not None:
            code = CodeEval(load_problems(cache_dir), limits)
        else:  # the default suite on a host that cannot isolate code: shown as excluded
            for n in names:
                if n in CODE_TASKS:
                    unavailable[n] = ("this worker cannot run model-written code in the sandbox (it needs root "
                                      "and Linux namespaces): the set was not measured")
            names = tuple(n for n in names if n not in CODE_TASKS)
            log.warning("HumanEval left out: %s", next(iter(unavailable.values())))
    folders = (builtin_tasks(cache_dir), *((user_dir,) if user_dir else ()))
    return TaskSuite(folders=folders, names=names, limit=s.task_limit, chat_template=s.chat_template, code=code,
                     unavailable=unavailable, answers=answers)
