"""Orbax checkpoints of everything resume needs: one `ocp.CheckpointManager` over three items.

    ckpt = Checkpoints(workdir, keep=3, save_every=1000)      # first: SIGTERM is caught from here on
    if ckpt.latest_step() is not None:                          # automatic resume
        state, _ = ckpt.restore(None, abstract(state), data_iter)
    for step in ...:
        ckpt.save(step, state, data_iter, config)              # no-op off the interval
        if ckpt.reached_preemption(step): break                # SIGTERM
    ckpt.save(step, state, data_iter, config, force=True); ckpt.close()

`workdir/checkpoints/<step>/` holds `state/` (the train state, written sharded by every process),
`data_iter/` (each process's grain iterator position, grain's Orbax handler), `config/` (JSON) and
`atlas_manifest.json`. Why the manifest: Orbax commits a save atomically, so a killed save is never
listed; but a committed step whose files were later lost, cut short or altered (a full disk, a bad
copy, a flipped bit) would be, and loaded without a word. The manifest, written by process 0 into
the tmp dir right before the commit, lists each file's size and sha256; `latest_step` skips a step
that fails it, with a warning naming the file, and `restore` refuses one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import signal
from collections.abc import Mapping

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from atlas_jax import multihost

log = logging.getLogger(__name__)

MANIFEST = "atlas_manifest.json"
STATE, DATA_ITER, CONFIG = "state", "data_iter", "config"
_REWRITTEN = frozenset({"_CHECKPOINT_METADATA", "commit_success.txt"})  # by Orbax's commit, after the manifest


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, corrupted, or does not fit the restore target."""


class Preempted(Exception):
    """Raised by a job that stopped early on SIGTERM (a preempted machine), after saving whatever it
    trained; the command line exits with `main.PREEMPTED`, not 0, so a scheduler runs it again."""

    def __init__(self, step: int, directory: epath.PathLike):
        super().__init__(f"stopped by SIGTERM at step {step}: run the same command again to resume "
                         f"from the newest checkpoint in {directory}")


def abstract(tree):
    """The restore target of `tree`: each jax.Array as a `jax.ShapeDtypeStruct` with its sharding."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding) if isinstance(x, jax.Array) else x, tree)


# ----------------------------------------------------------------------------- manifest
def _manifest_writing_path_class(root: epath.Path):
    """Orbax's default temporary-path class for `root` that also writes the manifest into a step's
    tmp dir when Orbax commits it (on the primary process, once every process wrote its files)."""
    base = ocp.path.atomicity_defaults.get_default_temporary_path_class(root)

    class ManifestWritingPath(base):
        async def finalize(self, *args, **kwargs):
            if self.get_final().parent.name == root.name:  # a step, not an item inside one
                step_dir = self.get()
                files = {(d / f).relative_to(step_dir).as_posix(): {"bytes": (d / f).stat().length, "sha256": _sha256(d / f)}
                         for d, _, names in step_dir.walk() for f in names if f not in _REWRITTEN}
                (step_dir / MANIFEST).write_text(json.dumps(files, indent=0, sort_keys=True))
            return await super().finalize(*args, **kwargs)

    return ManifestWritingPath


def _sha256(path: epath.Path) -> str:
    """The file's sha256, read in 16 MiB pieces (checkpoint files reach gigabytes)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for piece in iter(lambda: f.read(1 << 24), b""):
            digest.update(piece)
    return digest.hexdigest()


def _damage_in(step_dir: epath.Path) -> str | None:
    """None when `step_dir` holds every file its manifest lists, with the listed size and sha256;
    else what is wrong, naming the file. Sizes are checked first: no file is read if one is off."""
    manifest = step_dir / MANIFEST
    if not manifest.exists():
        return f"{manifest} is missing (the save did not finish, or the step was not written by atlas_jax)"
    try:
        files = {rel: (int(f["bytes"]), str(f["sha256"])) for rel, f in json.loads(manifest.read_text()).items()}
    except (ValueError, TypeError, KeyError, AttributeError) as e:  # UnicodeDecodeError is a ValueError
        return f"{manifest} is unreadable ({type(e).__name__}: {e}); expected {{file: {{bytes, sha256}}}}"
    for rel, (size, _) in files.items():
        if not (path := step_dir / rel).exists():
            return f"file {path} is missing"
        if (got := path.stat().length) != size:
            return f"file {path} has {got} bytes, expected {size}"
    for rel, (_, digest) in files.items():
        if (got := _sha256(step_dir / rel)) != digest:
            return f"file {step_dir / rel} does not match its checksum (sha256 {got}, expected {digest})"
    return None


# ----------------------------------------------------------------------------- checkpoints
class Checkpoints:
    """Saves and restores the train state, data-iterator position and config under
    `workdir/checkpoints`; catches SIGTERM (see `reached_preemption`) unless `read_only`.

    Every process calls each method at the same steps (arrays are written and read by the processes
    that own their shards; process 0's checksum verdict is shared). With `async_save`, `save`
    returns once the arrays are in host memory; the next `save` or `close` waits for the files.
    """

    def __init__(self, workdir: epath.PathLike, *, keep: int = 3, save_every: int = 1000,
                 async_save: bool = True, read_only: bool = False):
        self.directory = epath.Path(workdir) / "checkpoints"
        self.save_every = save_every
        self.manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, read_only=read_only, create=not read_only,
            cleanup_tmp_directories=not read_only,  # tmp dirs of saves killed mid-write
            temporary_path_class=_manifest_writing_path_class(self.directory),
        ), item_handlers={  # named up front, so a step's metadata can be read before restoring it
            STATE: ocp.PyTreeCheckpointHandler(), CONFIG: ocp.JsonCheckpointHandler(),
            DATA_ITER: grain.checkpoint.CheckpointHandler(),
        })
        # With several processes, jax.distributed's preemption notifier catches SIGTERM and Orbax's
        # `reached_preemption` names the step at which all save; one process has no notifier, so a flag.
        self._damage_of: dict[int, str | None] = {}  # step -> its `_damage_in` verdict
        self._sigterm, self._previous_handler = False, None
        if not read_only and jax.process_count() == 1:  # `or`: None means a handler set outside Python
            self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm) or signal.SIG_DFL

    def _on_sigterm(self, signum, frame) -> None:
        log.warning("received SIGTERM: will stop (before the first step, or after saving the current one)")
        self._sigterm = True

    def reached_preemption(self, step: int) -> bool:
        """Whether the run was told to stop (SIGTERM, e.g. a preempted pod): save and exit now.
        `step` must grow by one per call: JAX's sync point is the largest step any process saw, plus one."""
        return self._sigterm or self.manager.reached_preemption(step)

    def latest_step(self) -> int | None:
        """The newest intact step; newer incomplete or corrupted ones are skipped with a warning."""
        for step in sorted(self.manager.all_steps(), reverse=True):
            if (reason := self._damage(step)) is None:
                return step
            log.warning("skipping checkpoint step %d in %s: %s; falling back to an earlier step",
                        step, self.directory, reason)
        return None

    def save(self, step: int, state, data_iter: grain.DatasetIterator | None = None,
             config: Mapping | None = None, *, force: bool = False) -> bool:
        """Saves at every `save_every`-th step (any step with `force`); False when nothing was saved
        (off the interval, or this step is already saved complete). state: a pytree of arrays and
        numbers; data_iter: this process's grain iterator; config: JSON-serialisable (or a ConfigDict)."""
        step = int(step)
        if not force and step % self.save_every:
            return False
        config = config.to_dict() if hasattr(config, "to_dict") else dict(config or {})
        try:
            json.dumps(config)
        except TypeError as e:
            raise CheckpointError(f"config is not JSON-serialisable ({e}); expected numbers, strings, lists, dicts") from e
        self.manager.wait_until_finished()
        if step in self.manager.all_steps():
            if (reason := self._damage(step)) is None:
                return False
            self._set_aside(step, reason)
        items = {STATE: ocp.args.PyTreeSave(state), CONFIG: ocp.args.JsonSave(config)}
        if data_iter is not None:
            items[DATA_ITER] = grain.checkpoint.CheckpointSave(data_iter)
        self._damage_of.pop(step, None)
        return bool(self.manager.save(step, args=ocp.args.Composite(**items), force=True))

    def _damage(self, step: int) -> str | None:
        """`_damage_in` the step's directory, read on process 0 only (every file once per
        `Checkpoints`) and shared, so that every process takes the same step."""
        if step not in self._damage_of:
            reason = _damage_in(self.directory / str(step)) if jax.process_index() == 0 else None
            self._damage_of[step] = multihost.gather_objects(reason)[0]
        return self._damage_of[step]

    def _set_aside(self, step: int, reason: str) -> None:
        """Moves a damaged step out of the way of a new save of it (kept for inspection)."""
        if jax.process_index() == 0:
            dst, n = self.directory / f"{step}.incomplete", 1
            while dst.exists():
                n += 1
                dst = self.directory / f"{step}.incomplete-{n}"
            log.warning("checkpoint step %d in %s is damaged (%s); moving it to %s", step, self.directory, reason, dst)
            (self.directory / str(step)).rename(dst)
        multihost.barrier(f"atlas_checkpoint_set_aside_{step}")
        self.manager.reload()

    def restore(self, step: int | None, abstract_state, data_iter: grain.DatasetIterator | None = None):
        """(state, config) of `step` (None: the latest complete one), each array placed as its
        `abstract_state` leaf says (see `abstract`); `data_iter` (a fresh iterator of the same
        dataset) is moved to the saved position."""
        items = {CONFIG: ocp.args.JsonRestore()}
        if data_iter is not None:
            items[DATA_ITER] = grain.checkpoint.CheckpointRestore(data_iter)
        restored = self._restore(step, abstract_state, items)
        return restored[STATE], dict(restored[CONFIG] or {})

    def _restore(self, step: int | None, target, items: dict, partial: bool = False):
        """Orbax's restore of `items` and the state onto `target` (with `partial`, a subtree of it)."""
        if step is None and (step := self.latest_step()) is None:
            raise CheckpointError(f"no complete checkpoint in {self.directory}")
        if (reason := self._damage(step)) is not None:
            raise CheckpointError(f"checkpoint step {step} in {self.directory} is damaged: {reason}")
        _check_fits(self.directory / str(step), self.manager.item_metadata(step)[STATE].tree, target)
        items[STATE] = ocp.args.PyTreeRestore(
            target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=partial)
        return self.manager.restore(step, args=ocp.args.Composite(**items))

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _check_fits(where: epath.Path, saved_tree, target) -> None:
    """Names the leaf that does not fit (Orbax's own errors do not say which one)."""
    def by_name(tree):  # {'params/w_de/value': leaf, ...}
        return {jax.tree_util.keystr(p, simple=True, separator="/"): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
    saved = by_name(saved_tree)
    for key, leaf in by_name(target).items():
        if key not in saved:
            raise CheckpointError(f"checkpoint {where} has no {key}; it has {len(saved)} leaves, e.g. {sorted(saved)[:8]}")
        if not isinstance(leaf, jax.ShapeDtypeStruct):
            continue  # a Python number
        if leaf.sharding is None:
            raise CheckpointError(f"restore target {key} has no sharding: expected jax.ShapeDtypeStruct(shape, dtype, sharding=...)")
        is_key = jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)  # saved as its raw data: another shape
        if not is_key and tuple(saved[key].shape) != leaf.shape:
            raise CheckpointError(f"checkpoint {where}: {key} has shape {tuple(saved[key].shape)}, the target expects {leaf.shape}")


def init_from(workdir: epath.PathLike, abstract_params, *, step: int | None = None, item: str = "params"):
    """The `item` entry (the params) of another run's train state (its latest complete step by
    default), onto the sharded `abstract_params`; the rest of that run is not read."""
    with Checkpoints(workdir, read_only=True) as ckpt:
        return ckpt._restore(step, {item: abstract_params}, {}, partial=True)[STATE][item]
