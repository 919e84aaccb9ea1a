"""Orbax checkpoints of everything resume needs, and the SIGTERM flag that triggers a last save.

    ckpt = Checkpointer(workdir, keep=3, save_every=1000)
    if (step := ckpt.latest_step()) is not None:               # automatic resume
        state, data_state, config = ckpt.restore(step, abstract_state)
    for step in ...:
        ckpt.save(step, state, data_state=pipeline_state(it), config=cfg)   # no-op off the interval
        if preemption.should_stop(): ckpt.save(step, ..., force=True); break
    ckpt.close()

`workdir/checkpoints/<step>/` holds one Orbax item per top-level entry of the train state
(`params/`, `opt_state/`, `step/`, `rng/`, ... as nested dicts of arrays, written sharded by every
process), `data_iter/` (each process's data-iterator position, through grain's Orbax handler),
`config/` and `atlas_meta/` (JSON: the saved leaves' shapes and dtypes, to name a mismatching leaf
on restore) and `atlas_manifest.json`.

Why the manifest: Orbax already makes a save atomic (it writes `<step>.orbax-checkpoint-tmp` and
renames it, or writes a commit file on GCS), so a process killed mid-save leaves only a tmp dir that
is never listed. What it does not catch is a committed step whose files were later lost or cut
short (a full disk, a bad copy, a hand-deleted file). The manifest lists every file and its size;
it is written inside the tmp dir right before the commit, so a committed step either has it or was
not written here. `latest_step` skips, with a warning naming the file, any step that fails it.
"""

from __future__ import annotations

import json
import logging
import re
import signal
from collections.abc import Callable, Mapping
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

log = logging.getLogger(__name__)

MANIFEST = "atlas_manifest.json"
DATA_ITEM, CONFIG_ITEM, META_ITEM = "data_iter", "config", "atlas_meta"
RESERVED = (DATA_ITEM, CONFIG_ITEM, META_ITEM)
# Top-level files Orbax writes or rewrites after our manifest (in the same commit): required, size unchecked.
_UNSIZED = frozenset({"_CHECKPOINT_METADATA", "commit_success.txt"})
_STEP_NAME = re.compile(r"^(0|[1-9]\d*)$")  # Orbax's default step directory names
_ITEM_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_LEAF = "__leaf__"  # key of an item that is a single array (e.g. `step`)


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, or does not fit the restore target."""


# ----------------------------------------------------------------------------- pytree <-> items
def _key_str(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _split_items(tree) -> dict[str, dict[str, Any]]:
    """pytree -> {item name: {leaf name: leaf}}; the item is the first path entry, the leaf name the
    rest joined by '/' (`params/layers/0/w/value`)."""
    items: dict[str, dict[str, Any]] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        names = [_key_str(k) for k in path] or ["state"]
        item, rest = names[0], "/".join(names[1:]) or _LEAF
        if not _ITEM_NAME.match(item) or item in RESERVED:
            raise CheckpointError(
                f"train state entry {item!r} cannot name a checkpoint item: expected a name matching "
                f"{_ITEM_NAME.pattern} other than {RESERVED}"
            )
        leaves = items.setdefault(item, {})
        if rest in leaves:
            raise CheckpointError(f"train state leaves {item}/{rest} collide (e.g. dict keys 1 and '1')")
        leaves[rest] = leaf
    return items


def _nest(flat: Mapping[str, Any]) -> dict:
    """{'a/b': x, 'a/c': y} -> {'a': {'b': x, 'c': y}} (what Orbax's PyTree handler stores)."""
    out: dict = {}
    for name, leaf in flat.items():
        *parents, last = name.split("/")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = leaf
    return out


def _unnest(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_unnest(v, name + "/"))
        else:
            out[name] = v
    return out


def _to_saveable(leaf):
    if isinstance(leaf, (jax.Array, np.ndarray, np.generic)):
        return leaf
    if isinstance(leaf, (bool, int, float)):
        return np.asarray(leaf)
    raise CheckpointError(f"cannot checkpoint a leaf of type {type(leaf).__name__}; expected an array or a number")


def _to_target(name: str, leaf):
    """A restore target leaf: sharded abstract arrays stay; concrete jax arrays give their sharding."""
    if isinstance(leaf, jax.ShapeDtypeStruct):
        if leaf.sharding is None:
            raise CheckpointError(
                f"restore target {name} has no sharding: expected jax.ShapeDtypeStruct(shape, dtype, sharding=...)"
            )
        return leaf
    if isinstance(leaf, jax.Array):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
    return np.asarray(_to_saveable(leaf))  # host values come back as numpy (numbers: as their type)


def _leaf_meta(leaf) -> list:
    return [list(np.shape(leaf)), str(leaf.dtype)]


# ----------------------------------------------------------------------------- manifest
def _files(root: epath.Path) -> dict[str, epath.Path]:
    return {(d / f).relative_to(root).as_posix(): d / f for d, _, names in root.walk() for f in names}


def _write_manifest(step_dir: epath.Path) -> None:
    files = {rel: (None if rel in _UNSIZED else p.stat().length) for rel, p in sorted(_files(step_dir).items())}
    for rel in _UNSIZED:
        files.setdefault(rel, None)
    (step_dir / MANIFEST).write_text(json.dumps({"format": 1, "files": files}, indent=0))


def check_complete(step_dir: epath.PathLike) -> str | None:
    """None when `step_dir` holds every file its manifest lists, at the listed size; else the reason."""
    step_dir = epath.Path(step_dir)
    manifest = step_dir / MANIFEST
    if not manifest.exists():
        return f"{manifest} is missing (the save did not finish, or the step was not written by atlas_jax)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError) as e:
        return f"{manifest} is unreadable ({e})"
    for rel, size in files.items():
        path = step_dir / rel
        if not path.exists():
            return f"file {path} is missing"
        if size is not None and (got := path.stat().length) != size:
            return f"file {path} has {got} bytes, expected {size}"
    return None


def _manifest_path_class(root: epath.Path):
    """Orbax's default temporary-path class for `root` (rename locally, commit file on GCS), writing
    the manifest into a step's tmp dir right before Orbax commits it (after every item is final)."""
    base = ocp.path.atomicity_defaults.get_default_temporary_path_class(root)

    class ManifestTemporaryPath(base):
        async def finalize(self, *args, **kwargs):
            # Items (inside the step's tmp dir) are committed through the same class; only the step
            # directory gets a manifest. Orbax calls this on the primary process only, once all
            # processes finished writing.
            final = self.get_final()
            if final.parent.name == root.name and _STEP_NAME.match(final.name):
                _write_manifest(self.get())
            return await super().finalize(*args, **kwargs)

    return ManifestTemporaryPath


class _DataState:
    """Bytes dressed as an iterator for grain's Orbax handler, which stores `get_state()` per process
    (`process_<i>-of-<n>.json`), so each host resumes its own shard."""

    def __init__(self, state: bytes | None = None):
        self.state = state

    def get_state(self) -> bytes | None:
        return self.state

    def set_state(self, state: bytes) -> None:
        self.state = state

    def start_prefetch(self) -> None:
        pass


# ----------------------------------------------------------------------------- checkpointer
class Checkpointer:
    """Saves and restores the train state, data-iterator state and config under `workdir/checkpoints`.

    Every process must call `save`, `restore` and `close` (arrays are written and read shard by shard
    by the processes that own them). `save_every` steps between saves, `keep` newest steps kept.
    With `async_save`, `save` returns once the arrays are copied to host memory and the files are
    written in the background; the next `save`, `wait` or `close` waits for it.
    """

    def __init__(
        self,
        workdir: epath.PathLike,
        *,
        keep: int = 3,
        save_every: int = 1000,
        async_save: bool = True,
        read_only: bool = False,
    ):
        if keep < 1:
            raise CheckpointError(f"checkpoint keep={keep}: expected at least 1")
        if save_every < 1:
            raise CheckpointError(f"checkpoint save_every={save_every}: expected at least 1")
        self.directory = epath.Path(workdir) / "checkpoints"
        self.save_every = save_every
        self._warned: set[int] = set()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            save_interval_steps=save_every,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=not read_only,  # tmp dirs of saves killed mid-write
            create=not read_only,
            read_only=read_only,
            temporary_path_class=_manifest_path_class(self.directory),
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    # -- which steps exist
    def all_steps(self) -> list[int]:
        """Committed step directories, complete or not, oldest first (tmp dirs of killed saves are
        never listed)."""
        if not self.directory.exists():
            return []
        return sorted(int(p.name) for p in self.directory.iterdir() if _STEP_NAME.match(p.name) and p.is_dir())

    def step_dir(self, step: int) -> epath.Path:
        return self.directory / str(step)

    def latest_step(self) -> int | None:
        """The newest complete step; newer incomplete or corrupted ones are skipped with a warning."""
        for step in reversed(self.all_steps()):
            reason = check_complete(self.step_dir(step))
            if reason is None:
                return step
            if step not in self._warned:
                self._warned.add(step)
                log.warning("skipping checkpoint step %d in %s: %s; falling back to an earlier step",
                            step, self.directory, reason)
        return None

    # -- save
    def save(
        self,
        step: int,
        state,
        *,
        data_state: bytes | None = None,
        config: Mapping | None = None,
        force: bool = False,
    ) -> bool:
        """Saves at every `save_every`-th step (any step with `force`); False when nothing was saved
        (off the interval, or this step is already saved complete).

        state: any pytree of arrays (and numbers) whose top level names the items (params,
            opt_state, step, rng, ...); typed PRNG keys are stored as keys.
        data_state: this process's data-iterator position (UTF-8 bytes, e.g. `pipeline_state(it)`).
        config: JSON-serialisable (a ConfigDict is converted with `to_dict()`).
        """
        step = int(step)
        if not force and step % self.save_every:
            return False
        items = _split_items(state)  # validate names before waiting on anything
        config = config.to_dict() if hasattr(config, "to_dict") else dict(config or {})
        try:
            json.dumps(config)
        except TypeError as e:
            raise CheckpointError(
                f"config is not JSON-serialisable ({e}); expected plain numbers, strings, lists, dicts"
            ) from e
        if data_state is not None:
            try:
                bytes(data_state).decode("utf-8")
            except UnicodeDecodeError as e:
                raise CheckpointError(
                    f"data_state is not UTF-8 text ({e}); expected pipeline_state(it) JSON bytes"
                ) from e

        self._manager.wait_until_finished()
        if step in self.all_steps():
            reason = check_complete(self.step_dir(step))
            if reason is None:
                return False
            self._set_aside(step, reason)

        leaves = {name: {k: _to_saveable(v) for k, v in flat.items()} for name, flat in items.items()}
        shapes = {name: {k: _leaf_meta(v) for k, v in flat.items()} for name, flat in leaves.items()}
        meta = {"format": 1, "state": shapes}
        args = {name: ocp.args.StandardSave(_nest(flat)) for name, flat in leaves.items()}
        args[CONFIG_ITEM] = ocp.args.JsonSave(config)
        args[META_ITEM] = ocp.args.JsonSave(meta)
        if data_state is not None:
            args[DATA_ITEM] = grain.checkpoint.CheckpointSave(_DataState(bytes(data_state)))
        # `force` here only skips Orbax's own schedule: we decided above.
        return bool(self._manager.save(step, args=ocp.args.Composite(**args), force=True))

    def _set_aside(self, step: int, reason: str) -> None:
        """Moves an incomplete step out of the way of a new save of the same step (kept for inspection)."""
        if jax.process_index() == 0:
            dst = self.directory / f"{step}.incomplete"
            n = 1
            while dst.exists():
                n += 1
                dst = self.directory / f"{step}.incomplete-{n}"
            log.warning("checkpoint step %d in %s is incomplete (%s); moving it to %s before saving it again",
                        step, self.directory, reason, dst)
            self.step_dir(step).rename(dst)
        _sync(f"atlas_checkpoint_set_aside_{step}")
        self._manager.reload()

    # -- restore
    def restore(self, step: int | None, abstract_state) -> tuple[Any, bytes | None, dict]:
        """(state, data_state, config) of `step` (None: the latest complete one), every array placed
        with its target's sharding.

        abstract_state: the train state's structure with `jax.ShapeDtypeStruct(shape, dtype,
            sharding=...)` (or arrays, or numbers) as leaves.
        data_state: this process's bytes, or None when the step was saved without one.
        """
        step = self._complete_step(step)
        targets = _split_items(abstract_state)
        meta = self._restore_json(step, META_ITEM)
        self._check_fits(step, targets, meta["state"])
        args = {
            name: ocp.args.StandardRestore(_nest({k: _to_target(f"{name}/{k}", v) for k, v in flat.items()}))
            for name, flat in targets.items()
        }
        args[CONFIG_ITEM] = ocp.args.JsonRestore()
        has_data = (self.step_dir(step) / DATA_ITEM).exists()
        if has_data:
            self._check_data_state_file(step)
            args[DATA_ITEM] = grain.checkpoint.CheckpointRestore(_DataState())
        restored = self._manager.restore(step, args=ocp.args.Composite(**args))
        state = _assemble(abstract_state, {name: _unnest(restored[name]) for name in targets})
        data_state = restored[DATA_ITEM].get_state() if has_data else None
        return state, data_state, dict(restored[CONFIG_ITEM] or {})

    def restore_item(self, step: int | None, name: str, abstract):
        """One state item alone (e.g. `params` for `init_from`), onto `abstract` (that item's tree)."""
        step = self._complete_step(step)
        meta = self._restore_json(step, META_ITEM)
        if name not in meta["state"]:
            raise CheckpointError(
                f"checkpoint {self.step_dir(step)} has no item {name!r}; it has {sorted(meta['state'])}"
            )
        flat = {"/".join(_key_str(k) for k in path) or _LEAF: leaf
                for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]}
        self._check_fits(step, {name: flat}, {name: meta["state"][name]})
        target = _nest({k: _to_target(f"{name}/{k}", v) for k, v in flat.items()})
        args = ocp.args.Composite(**{name: ocp.args.StandardRestore(target)})
        restored = self._manager.restore(step, args=args)
        values = _unnest(restored[name])
        leaves = [_from_restored(leaf, values[k]) for k, leaf in zip(flat, jax.tree.leaves(abstract))]
        return jax.tree.unflatten(jax.tree.structure(abstract), leaves)

    def _complete_step(self, step: int | None) -> int:
        if step is None:
            step = self.latest_step()
            if step is None:
                raise CheckpointError(f"no complete checkpoint in {self.directory}")
            return step
        if (reason := check_complete(self.step_dir(step))) is not None:
            raise CheckpointError(f"checkpoint step {step} in {self.directory} is incomplete: {reason}")
        return int(step)

    def _check_data_state_file(self, step: int) -> None:
        """grain's handler reads `process_<i>-of-<n>.json`: the same number of processes must resume."""
        folder = self.step_dir(step) / DATA_ITEM
        mine = folder / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        if not mine.exists():
            saved = sorted(p.name for p in folder.iterdir() if p.name.startswith("process_"))
            raise CheckpointError(
                f"checkpoint {self.step_dir(step)} has no data-iterator state {mine.name} for this process; it has "
                f"{saved} (resume with the process count the run was saved with, or restore without the data state)"
            )

    def _restore_json(self, step: int, item: str) -> dict:
        return self._manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))[item]

    def _check_fits(self, step: int, targets: dict, saved: dict) -> None:
        where = self.step_dir(step)
        missing = sorted(set(targets) - set(saved))
        if missing:
            raise CheckpointError(f"checkpoint {where} has no item(s) {missing}; it has {sorted(saved)}")
        for name, flat in targets.items():
            absent = sorted(set(flat) - set(saved[name]))
            if absent:
                raise CheckpointError(
                    f"checkpoint {where} item {name!r} lacks leaves {absent[:5]} (of {len(absent)})"
                )
            for k, leaf in flat.items():
                shape, dtype = saved[name][k]
                if tuple(shape) != tuple(np.shape(leaf)):
                    raise CheckpointError(
                        f"checkpoint {where}: {name}/{k} has shape {tuple(shape)}, "
                        f"the target expects {tuple(np.shape(leaf))}"
                    )
                if hasattr(leaf, "dtype") and str(leaf.dtype) != dtype:
                    log.warning("checkpoint %s: %s/%s is %s, restoring as %s", where, name, k, dtype, leaf.dtype)

    # -- lifecycle
    def wait(self) -> None:
        """Blocks until a background save has been committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _from_restored(target_leaf, value):
    if isinstance(target_leaf, (bool, int, float)) and not isinstance(target_leaf, np.generic):
        return type(target_leaf)(np.asarray(value).item())
    return value


def _assemble(abstract_state, values: dict[str, dict[str, Any]]):
    flat = jax.tree_util.tree_flatten_with_path(abstract_state)
    leaves = []
    for path, leaf in flat[0]:
        names = [_key_str(k) for k in path] or ["state"]
        leaves.append(_from_restored(leaf, values[names[0]]["/".join(names[1:]) or _LEAF]))
    return jax.tree.unflatten(flat[1], leaves)


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def init_from(workdir: epath.PathLike, abstract_params, *, step: int | None = None, item: str = "params"):
    """`item` (the params) of another run's checkpoint (its latest complete step by default), onto the
    sharded `abstract_params`; the rest of that run (optimizer, step, data) is not read."""
    ckpt = Checkpointer(workdir, async_save=False, read_only=True)
    try:
        return ckpt.restore_item(step, item, abstract_params)
    finally:
        ckpt.close()


# ----------------------------------------------------------------------------- preemption
class Preemption:
    """Set when the process receives SIGTERM (a preempted pod gets it some seconds before SIGKILL).

    The training loop polls `should_stop()`; on True it saves (`force=True`), waits and exits.
    """

    def __init__(self, callback: Callable[[int], None] | None, signum: int):
        self._callback = callback
        self._signum = signum
        self.requested = False
        previous = signal.signal(signum, self._handle)
        self._previous = signal.SIG_DFL if previous is None else previous  # None: set outside Python

    def _handle(self, signum, frame) -> None:
        self.requested = True
        log.warning("received signal %d: will save a checkpoint and stop", signum)
        if self._callback is not None:
            self._callback(signum)

    def should_stop(self) -> bool:
        """Whether any process was signalled. With several processes this is a collective: every
        process must call it at the same steps (they must all save the same step)."""
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        return bool(np.max(multihost_utils.process_allgather(np.int32(self.requested))))

    def __bool__(self) -> bool:
        return self.requested

    def uninstall(self) -> None:
        """Puts back the handler that was there before."""
        signal.signal(self._signum, self._previous)


def install_sigterm_handler(
    callback: Callable[[int], None] | None = None, *, signum: int = signal.SIGTERM
) -> Preemption:
    """Catches SIGTERM (instead of dying) and returns the flag the training loop checks; `callback`
    (optional, must be quick) is called with the signal number. Call from the main thread."""
    try:
        return Preemption(callback, signum)
    except ValueError as e:  # signal.signal outside the main thread
        raise RuntimeError(f"install_sigterm_handler must be called from the main thread ({e})") from e
