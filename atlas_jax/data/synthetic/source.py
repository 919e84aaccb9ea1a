"""The synthetic suite as a random-access record source, generated on the fly (nothing stored).

    train = SyntheticSource("train", num_per_task=None, seed=0)     # unlimited: 2**40 records
    shifted = SyntheticSource("shifted", num_per_task=128, seed=0)  # 128 per task, 1024 records

Record i is sample i // T of task i % T (T tasks, interleaved, so any prefix covers all tasks),
as the record dict a stored split gives (`records.encode_sample`): the input pipeline, evaluation
and baselines read both alike. Every record is a pure function of (split, i, seed), so a shuffled
stream over the unlimited source never repeats an example within a run and is reproduced exactly
from the seed (and resumed from the pipeline's integer state).

`perception_every=N` (the unlimited `train` split only) makes every N-th record a dense
perception question (`perception.py`, the starting point's pretraining data) and shifts the task
records past it, so the families' records keep their order: fine-tuning a perception-pretrained
model on the families alone erases its reading of the image within 100 steps (held-out
perception, token accuracy with own / swapped image 0.868 / 0.815 before, 0.388 / 0.387 after,
at the suite's lr or with the tower frozen); with every third record a perception question it
keeps it (0.864 / 0.814 after 300 steps, issue 12).
"""

from __future__ import annotations

from collections.abc import Sequence

from atlas_jax.data.records import encode_sample
from atlas_jax.data.synthetic import perception
from atlas_jax.data.synthetic.registry import DEFAULT_IMAGE_SIZE, generate, task_names

UNLIMITED = 2**40  # records in an "unlimited" source: far more than any run reads


class SyntheticSource(Sequence):
    """`len()` and `[i]` -> record dict (`records.encode_sample`); picklable for Grain workers.
    num_per_task None = unlimited; tasks None = the default suite (`task_names()`); image_size None = the generator's;
    perception_every N > 0: records 0, N, 2N, ... are perception questions (unlimited train only)."""

    def __init__(self, split: str, num_per_task: int | None, seed: int = 0, tasks: Sequence[str] | None = None,
                 image_size: int | None = None, perception_every: int = 0):
        if num_per_task is not None and num_per_task < 1:
            raise ValueError(f"num_per_task must be None (unlimited) or >= 1; got {num_per_task}")
        if perception_every < 0 or (perception_every and (split != "train" or num_per_task is not None)):
            raise ValueError(f"perception_every={perception_every}: expected 0, or > 0 for the unlimited train split only "
                             f"(got split {split!r}, num_per_task {num_per_task}); evaluations measure the families alone")
        self.split, self.seed, self.image_size, self.perception_every = split, seed, image_size, perception_every
        self.tasks = list(tasks) if tasks is not None else task_names()
        self._len = UNLIMITED if num_per_task is None else num_per_task * len(self.tasks)
        # A finite source (an evaluation split) keeps its records, a few KB each: evaluation reads
        # each twice (picking prompts per task, then the pipeline), and generating is the slow part.
        self._kept: dict[int, dict] | None = None if num_per_task is None else {}
        size = "unlimited" if num_per_task is None else f"{num_per_task} per task"
        size += f", every {perception_every}th record a perception question" if perception_every else ""
        self.source = f"synthetic:{split} (seed {seed}, {size})"  # for error messages

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self._len:
            raise IndexError(f"{self.source}: index {index} out of range for {self._len} records")
        if self._kept is not None and index in self._kept:
            return self._kept[index]
        every = self.perception_every
        if every:
            if index % every == 0:
                size = DEFAULT_IMAGE_SIZE if self.image_size is None else self.image_size
                return encode_sample(perception.generate("train", index // every, self.seed, size))
            index -= index // every + 1  # the task records before it: the families' order is unchanged
        task, k = self.tasks[index % len(self.tasks)], index // len(self.tasks)
        record = encode_sample(generate(task, self.split, k, self.seed, image_size=self.image_size))
        if self._kept is not None:
            self._kept[index] = record
        return record

    def __repr__(self) -> str:
        return f"SyntheticSource({self.source!r})"
