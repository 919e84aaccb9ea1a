"""The Grain input pipeline: records -> fixed-shape SFT / RL batches, per host, resumable exactly.

    ds = make_dataset(source, tok, RunTokens.of(tok), PipelineConfig(...), model_cfg)
    it = iter(ds)                                  # a PipelineIterator (a grain DatasetIterator)
    batch = to_global(next(it), mesh)              # a dict of global jax.Arrays + host metadata
    state = pipeline_state(it)                     # bytes; restore(iter(ds), state) resumes exactly

Order of operations (all but the last two are index arithmetic on a `grain.MapDataset`, so the
iterator state is a handful of integers and resuming is exact):
  1. seeded shuffle of the whole source, re-seeded every epoch (`grain` derives epoch e's
     permutation from seed + e), the same on every host;
  2. repeat for `num_epochs` (None = forever); a finite stream is topped up with its first
     records to whole global batches;
  3. per-host block: host h takes rows [h * b, (h + 1) * b) of every global batch of the stream
     (b = batch_size / process_count), the rows `to_global` gives it (`device_batch`);
  4. decode + preprocess + encode (`batching.ExampleBuilder`), threads or worker processes;
  5. skip-and-count bad records (only with `skip_bad_records`), batch and pad (`batching.collate`).

Checkpointing: `pipeline_state` / `restore` give JSON bytes; the iterator is also a plain
`grain.DatasetIterator`, so `grain.checkpoint.CheckpointHandler` (Orbax) saves it per process.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

import grain
import jax
import numpy as np
from absl import logging

from atlas_jax import tokenizer as tokenizer_lib
from atlas_jax.data import batching, device_batch
from atlas_jax.data.image_processing import ImageProcessorConfig
from atlas_jax.data.sample import BadRecordError
from atlas_jax.model.config import ConfigError, ModelConfig


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """batch_size: GLOBAL batch (each of process_count hosts builds batch_size / process_count).
    max_length: T, the longest tokenized sample accepted; max_patches: P, patch rows per sample
    (a multiple of spatial_merge_size**2); max_images: image slots per sample.
    pad_to_multiple: length buckets; a batch is padded to its longest sample rounded up to this
      multiple (capped at max_length); 0 = always max_length. Multi-host runs always use
      max_length, because every host must hand jax the same local shape.
    format: 'sft' (full trajectories) | 'rl' (left-padded prompts + answers).
    sft_target: 'trajectory' (with functional tokens) | 'answer_only' (the baseline response) |
      'mixed' (each record one of the two: the answer-only response with probability
      answer_only_share, drawn from the record's uid, so every host, epoch and resume picks alike;
      a teacher that walks through the operation on only some records, the setting in which RL
      has to learn where the operation helps: bench/RESULTS.md).
    skip_bad_records: False raises BadRecordError naming the record; True skips and counts it.
    worker_count: 0 = decode in `read_threads` threads of this process; > 0 = worker processes.
    """

    batch_size: int
    max_length: int
    max_patches: int
    max_images: int = 1
    image: ImageProcessorConfig = ImageProcessorConfig()
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None
    skip_bad_records: bool = False
    worker_count: int = 0
    read_threads: int = 2
    read_buffer: int = 16
    pad_to_multiple: int = 64
    format: str = "sft"
    sft_target: str = "trajectory"
    answer_only_share: float = 0.5
    min_images: int = 1
    answer_mismatch: str = "error"

    def __post_init__(self):
        def need(ok: bool, field: str, expected: str):
            if not ok:
                raise ConfigError(f"data.{field}={getattr(self, field)!r}: expected {expected}")

        need(self.batch_size > 0, "batch_size", "a positive global batch size")
        need(self.max_length > 0, "max_length", "a positive token count")
        need(self.max_patches > 0 and self.max_patches % self.image.merge_size**2 == 0, "max_patches",
             f"a positive multiple of merge_size**2={self.image.merge_size**2}")
        need(self.max_images >= 0, "max_images", ">= 0")
        need(0 <= self.min_images <= self.max_images, "min_images", f"0 <= min_images <= max_images={self.max_images}")
        need(self.num_epochs is None or self.num_epochs > 0, "num_epochs", "None (forever) or a positive count")
        need(0 <= self.seed < 2**32, "seed", "an integer in [0, 2**32)")
        need(self.worker_count >= 0 and self.read_threads >= 0, "worker_count", ">= 0 (and read_threads >= 0)")
        need(self.pad_to_multiple >= 0, "pad_to_multiple", ">= 0 (0 = always max_length)")
        need(self.format in ("sft", "rl"), "format", "'sft' or 'rl'")
        need(self.sft_target in ("trajectory", "answer_only", "mixed"), "sft_target", "'trajectory', 'answer_only' or 'mixed'")
        need(0.0 <= self.answer_only_share <= 1.0, "answer_only_share", "a fraction in [0, 1]")


# ----------------------------------------------------------------------------- sharding
class _Indexed:
    """Random access to the source's records as (source index, record) pairs."""

    def __init__(self, source: Sequence):
        self._source = source

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, i: int):
        return int(i), self._source[int(i)]


class _HostBlock(grain.MapDataset):
    """Row j of host `host`'s k-th batch is position k * n * b + host * b + j of the stream."""

    def __init__(self, parent: grain.MapDataset, host: int, hosts: int, per_host: int):
        super().__init__(parent)
        self._host, self._per_host, self._global = host, per_host, hosts * per_host
        self._length = len(parent) // self._global * per_host

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        batch, row = divmod(index, self._per_host)
        return self._parent[batch * self._global + self._host * self._per_host + row]

    def __str__(self) -> str:
        return f"_HostBlock(host={self._host}, per_host={self._per_host}, global={self._global})"


def global_stream(source: Sequence, cfg: PipelineConfig, process_index: int, process_count: int) -> grain.MapDataset:
    """This host's share of ONE global record stream.

    All hosts shuffle the whole source with the same seed (re-shuffled every epoch), cut the
    stream into global batches of cfg.batch_size records, and host h takes block
    [h * b, (h + 1) * b) of each (b = batch_size / process_count). Global batch k therefore holds
    the same records in the same order whatever the number of hosts, and the hosts' shares are
    disjoint and cover every epoch. A finite stream is topped up with its first records to whole
    global batches, so every record is seen and every host takes the same number of steps.
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} outside [0, process_count={process_count})")
    if len(source) == 0:
        raise ValueError("the data source is empty; expected at least one record")
    ds = grain.MapDataset.source(_Indexed(source))
    if cfg.shuffle:
        ds = ds.shuffle(seed=cfg.seed)
    ds = ds.repeat(cfg.num_epochs)
    while cfg.num_epochs is not None and len(ds) % cfg.batch_size:
        ds = grain.MapDataset.concatenate([ds, ds[: cfg.batch_size - len(ds) % cfg.batch_size]])
    return _HostBlock(ds, process_index, process_count, cfg.batch_size // process_count)


# ----------------------------------------------------------------------------- skipping
class _BuildOrMark:
    """Runs the ExampleBuilder; in skip mode a BadRecordError becomes a `BadExample` marker."""

    def __init__(self, builder: batching.ExampleBuilder, skip: bool):
        self.builder, self.skip = builder, skip

    def __call__(self, indexed_record):
        if not self.skip:
            return self.builder(indexed_record)
        try:
            return self.builder(indexed_record)
        except BadRecordError as e:
            return batching.BadExample(str(e))


class _SkipBadIterator(grain.DatasetIterator):
    """Drops BadExample markers, logging each, and tells the next good example how many it follows.
    As many bad records in a row as the source holds mean that none is usable (e.g. `max_length`
    below every sample's image tokens): that stops the run instead of reading forever."""

    def __init__(self, parent: grain.DatasetIterator, source_name: str, source_size: int):
        super().__init__(parent)
        self._source_name, self._source_size = source_name, source_size

    def __next__(self):
        skipped, first_error = 0, None
        while True:
            ex = next(self._parent)
            if isinstance(ex, batching.BadExample):
                skipped += 1
                first_error = first_error or ex.error
                logging.warning("skipping bad record: %s", ex.error)
                if skipped >= self._source_size:
                    raise ConfigError(
                        f"every record of {self._source_name} is skipped as bad (data.skip_bad_records): the last "
                        f"{skipped} read, as many as it holds, were all bad; the first because: {first_error}")
                continue
            return {**ex, "skipped": skipped}

    def get_state(self):
        return self._parent.get_state()

    def set_state(self, state):
        self._parent.set_state(state)


class _SkipBadDataset(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, source_name: str, source_size: int):
        super().__init__(parent)
        self._source_name, self._source_size = source_name, source_size

    def __iter__(self):
        return _SkipBadIterator(self._parent.__iter__(), self._source_name, self._source_size)


# ----------------------------------------------------------------------------- the dataset
class PipelineIterator(grain.DatasetIterator):
    """Host batches (numpy + metadata lists). `num_skipped` counts bad records skipped so far;
    it is part of the state, so it survives a restore. A skip is counted with the batch it
    precedes, so skips just before the partial batch that a finite run drops are not counted.
    With skip_bad_records and a finite num_epochs, hosts can run out after different numbers of
    batches: multi-host jobs should bound the loop by steps, not by the data running out."""

    def __init__(self, parent: grain.DatasetIterator):
        super().__init__(parent)
        self.num_skipped = 0

    def __next__(self) -> dict:
        batch = next(self._parent)
        self.num_skipped += batch["skipped"]
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"grain": self._parent.get_state(), "num_skipped": self.num_skipped}

    def set_state(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or "grain" not in state:
            raise ValueError(f"pipeline state {str(state)[:200]!r}: expected a dict with a 'grain' entry")
        self._parent.set_state(state["grain"])
        self.num_skipped = int(state.get("num_skipped", 0))


class PipelineDataset(grain.IterDataset):
    """What `make_dataset` returns: iterate it for a fresh `PipelineIterator`."""

    def __init__(self, parent: grain.IterDataset, cfg: PipelineConfig, per_host_batch: int):
        super().__init__(parent)
        self.cfg, self.per_host_batch = cfg, per_host_batch

    def __iter__(self) -> PipelineIterator:
        return PipelineIterator(self._parent.__iter__())


def _check_compatible(tokens: tokenizer_lib.RunTokens, cfg: PipelineConfig, model_cfg: ModelConfig) -> None:
    v = model_cfg.vision
    pairs = [("patch_size", v.patch_size), ("temporal_patch_size", v.temporal_patch_size), ("merge_size", v.spatial_merge_size)]
    for field, want in pairs:
        if getattr(cfg.image, field) != want:
            raise ConfigError(f"data.image.{field}={getattr(cfg.image, field)} differs from the vision tower's {want}")
    for token, field, tid in (
        (tokenizer_lib.IMAGE_PAD, "image_token_id", tokens.image_id),
        ("<|vision_start|>", "vision_start_token_id", tokens.vision_start_id),
        ("<|vision_end|>", "vision_end_token_id", tokens.vision_end_id),
    ):
        if tid != getattr(model_cfg, field):
            raise ConfigError(f"model.{field}={getattr(model_cfg, field)} but the tokenizer has {token} = id {tid}")


def make_dataset(
    source: Sequence,
    tok,
    tokens: tokenizer_lib.RunTokens,
    cfg: PipelineConfig,
    model_cfg: ModelConfig,
    *,
    source_name: str | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> PipelineDataset:
    """The per-host batch stream over `source` (random access: a list, a `tfds.data_source`, ...,
    holding `Sample`s or record dicts), tokenized by `tok`, whose run constants `tokens` are (the
    functional tokens allowed in responses among them). source_name appears in bad-record messages."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if cfg.batch_size % process_count:
        raise ConfigError(f"data.batch_size={cfg.batch_size} is not divisible by process_count={process_count}")
    per_host_batch = cfg.batch_size // process_count
    _check_compatible(tokens, cfg, model_cfg)
    if source_name is None:  # e.g. tfds_builder.RecordSource.source = 'atlas_synthetic/tiny:train'
        named = [getattr(source, a, None) for a in ("source", "name")]
        source_name = next((n for n in named if isinstance(n, str) and n), type(source).__name__)
    builder = batching.ExampleBuilder(
        tok,
        model_cfg,
        cfg.image,
        source_name=source_name,
        fmt=cfg.format,
        answer_only_share={"trajectory": 0.0, "answer_only": 1.0}.get(cfg.sft_target, cfg.answer_only_share),
        max_length=cfg.max_length,
        max_patches=cfg.max_patches,
        max_images=cfg.max_images,
        min_images=cfg.min_images,
        functional_ids=tokens.functional_ids,
        functional_strings=tokens.functional_strings,
        answer_mismatch=cfg.answer_mismatch,
    )
    pad_to_multiple = cfg.pad_to_multiple
    if process_count > 1 and pad_to_multiple:
        logging.info("data: %d hosts, so batches are padded to max_length=%d (no length buckets)", process_count, cfg.max_length)
        pad_to_multiple = 0

    ds = global_stream(source, cfg, process_index, process_count)
    ds = ds.map(_BuildOrMark(builder, cfg.skip_bad_records))
    threads = cfg.read_threads if cfg.worker_count == 0 else 0
    ids = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=cfg.read_buffer))
    ids = _SkipBadDataset(ids, source_name, len(source))
    ids = ids.batch(
        per_host_batch,
        drop_remainder=True,
        batch_fn=_Collate(
            fmt=cfg.format,
            pad_id=tokens.pad_id,
            max_length=cfg.max_length,
            pad_to_multiple=pad_to_multiple,
            max_patches=cfg.max_patches,
            max_images=cfg.max_images,
            patch_dim=cfg.image.patch_dim,
        ),
    )
    if cfg.worker_count > 0:
        ids = ids.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.worker_count))
    return PipelineDataset(ids, cfg, per_host_batch)


class _Collate:
    """`batching.collate` with fixed settings (a class, not a lambda, so worker processes can pickle it)."""

    def __init__(self, **kw):
        self.kw = kw

    def __call__(self, examples):
        return batching.collate(examples, **self.kw)


# ----------------------------------------------------------------------------- state
def pipeline_state(it: PipelineIterator) -> bytes:
    """The iterator position as JSON bytes (for a checkpoint; grain's Orbax `CheckpointHandler`
    stores the same `get_state()` dict per process)."""
    return json.dumps(it.get_state(), sort_keys=True).encode()


def restore(it: PipelineIterator, state: bytes | str | dict) -> PipelineIterator:
    """Moves a fresh iterator of the same dataset to `state`; the next batch is the one an
    uninterrupted iterator would have produced."""
    if isinstance(state, (bytes, str)):
        try:
            state = json.loads(state)
        except json.JSONDecodeError as e:
            raise ValueError(f"pipeline state is not valid JSON ({e}); expected bytes from pipeline_state()") from e
    it.set_state(state)
    return it


# ----------------------------------------------------------------------------- devices
def to_global(batch: dict, mesh) -> dict:
    """One host batch -> global jax.Arrays, this host's rows forming block process_index of
    each (`device_batch`); metadata stays on the host."""
    shards = device_batch.batch_shardings(batch, mesh)
    out = {}
    for key, x in batch.items():
        if key not in shards:
            out[key] = x
            continue
        global_shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
        rows = shards[key].spec[0]
        n = int(np.prod([mesh.shape[a] for a in jax.tree.leaves(rows)])) if rows else 1
        if global_shape[0] % n:
            raise ConfigError(f"data.batch_size={global_shape[0]} is not divisible by the {n} devices of mesh axes {rows}")
        _check_host_block(shards[key], global_shape)
        out[key] = jax.make_array_from_process_local_data(shards[key], x, global_shape)
    return out


def _check_host_block(sharding: jax.sharding.NamedSharding, global_shape: tuple[int, ...]) -> None:
    """The rows of this process's devices must be block process_index of the global batch: the
    rows its pipeline read (`global_stream`)."""
    per_host, me = global_shape[0] // jax.process_count(), jax.process_index()
    held = sorted({s[0].indices(global_shape[0])[:2] for s in sharding.addressable_devices_indices_map(global_shape).values()})
    want = (me * per_host, (me + 1) * per_host)
    if (held[0][0], held[-1][1]) != want or any(a[1] != b[0] for a, b in zip(held, held[1:])):
        raise ConfigError(
            f"process {me}'s devices hold rows {held} of the global batch, not the block [{want[0]}, {want[1]}) "
            "its input pipeline reads: order the mesh's devices by process along the 'data' and 'fsdp' axes"
        )
