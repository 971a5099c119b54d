"""``load_task``: the task named by a TaskConfig, as train and test problem lists.

Dispatch is by the config's schema (its dataclass) through ``LOADERS``, not by its name: a task file of one's own
(``conf/task/my_gsm.yaml`` naming ``/schema/GSM8KTaskConfig@_here_``, with its own ``name`` and ``data_dir``) loads
through the GSM8K loader. Each loader returns its task's full splits in a fixed order;
``load_task`` then takes subsets the same way for every task: the test split is the first ``n_test`` problems in
that order (so every run evaluates on the same problems), the train split the first ``n_train`` after a shuffle
seeded by ``subset_seed`` (so a small train subset is not biased to the start of the file). With ``n_train``
None the train split keeps its order unshuffled: the training loops shuffle their own batches.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from reasoning_rl.config import ArithTaskConfig, GSM8KTaskConfig, GSMSymbolicTaskConfig, SVAMPTaskConfig, TaskConfig
from reasoning_rl.tasks.arith import load_arith
from reasoning_rl.tasks.gsm8k import load_gsm8k
from reasoning_rl.tasks.problem import TaskDataError, TaskSplits
from reasoning_rl.tasks.svamp import load_svamp
from reasoning_rl.tasks.symbolic import load_gsm_symbolic

# Each loader takes its own TaskConfig subclass, hence Any.
LOADERS: dict[type[TaskConfig], Callable[[Any], TaskSplits]] = {
    GSM8KTaskConfig: load_gsm8k,
    SVAMPTaskConfig: load_svamp,
    GSMSymbolicTaskConfig: load_gsm_symbolic,
    ArithTaskConfig: load_arith,
}


def subset_splits(splits: TaskSplits, n_train: int | None, n_test: int | None, subset_seed: int) -> TaskSplits:
    """The first ``n_test`` test problems and the first ``n_train`` train problems after a shuffle seeded by
    ``subset_seed``; None keeps a split whole (and in order). Asking for more than there are gives all."""
    for name, n in (("n_train", n_train), ("n_test", n_test)):
        if n is not None and n < 0:
            raise ValueError(f"task.{name}={n} must be >= 0 or null (all problems)")
    test = list(splits.test) if n_test is None else splits.test[:n_test]
    train = list(splits.train)
    if n_train is not None:
        random.Random(subset_seed).shuffle(train)
        train = train[:n_train]
    return TaskSplits(train=train, test=test)


def load_task(cfg: TaskConfig) -> TaskSplits:
    """Load the task ``cfg`` describes (the loader of its schema) and take the configured subsets. Relative paths
    in ``cfg`` are resolved against the working directory (callers resolve them against the project first).

    Unlike ``subset_splits``, it refuses an empty split and a subset larger than its split (a sweep over
    ``task.n_train`` would otherwise run its largest values on one and the same, smaller, training set)."""
    loader = LOADERS.get(type(cfg))
    if loader is None:
        schemas = ", ".join(schema.__name__ for schema in LOADERS)
        raise ValueError(
            f"unknown task {cfg.name!r} (schema {type(cfg).__name__}); a task's file names one of: {schemas}"
        )
    splits = loader(cfg)
    for split, problems, key, n in (
        ("train", splits.train, "n_train", cfg.n_train),
        ("test", splits.test, "n_test", cfg.n_test),
    ):
        if not problems:
            raise TaskDataError(f"task {cfg.name} has no {split} problems; check its data and settings (task.*).")
        if n is not None and n > len(problems):
            raise TaskDataError(
                f"task.{key}={n}, but task {cfg.name} has only {len(problems)} {split} problems: lower task.{key}, "
                "or set it to null to use them all."
            )
    return subset_splits(splits, cfg.n_train, cfg.n_test, cfg.subset_seed)
