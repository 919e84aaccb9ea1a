"""Checkpoints: exact sharded round trip (params, AdamW state, step, typed PRNG keys, data iterator,
config), keep-N, save_every, async saves, init_from, a save killed mid-write, corrupted steps skipped
with a warning, SIGTERM sets the flag (in this process and in a subprocess that then saves and exits)."""

import hashlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from etils import epath
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from atlas_jax import checkpoint, sharding
from atlas_jax.checkpoint import CheckpointError, Checkpoints

sys.path.insert(0, str(Path(__file__).parent))
import checkpoint_writer  # noqa: E402

WRITER = Path(__file__).parent / "checkpoint_writer.py"


class Tiny(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.w_de = nnx.Param(jax.random.normal(rngs.params(), (16, 8)), axes=("embed", "mlp"))
        self.b_e = nnx.Param(jnp.zeros((8,), jnp.bfloat16), axes=("mlp",))


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh((2, 2, 2))


def train_state(mesh, seed=0):
    """params (sharded nnx.State), AdamW state after one update, int step, typed keys (2 impls)."""
    params = nnx.split(sharding.sharded_init(lambda: Tiny(nnx.Rngs(seed)), mesh))[1]
    tx = optax.adamw(1e-2)
    opt_state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return {
        "params": params,
        "opt_state": opt_state,
        "step": jnp.int32(17),
        "rng": jax.random.split(jax.random.key(seed + 3), 2),
        "rbg": jax.random.key(seed + 5, impl="rbg"),
        "epoch": 2,  # a plain Python number
    }


def abstract_of(state, mesh, override=None):
    """The restore target: shapes and dtypes of `state`, the model's shardings (or `override`)."""
    replicated = NamedSharding(mesh, P())

    def one(x):
        if not isinstance(x, jax.Array):
            return x
        s = x.sharding if isinstance(x.sharding, NamedSharding) else replicated
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=override or s)

    return jax.tree.map(one, state)


def as_numpy(x):
    if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        return np.asarray(jax.random.key_data(x))
    return np.asarray(x)


def assert_same(restored, original, abstract):
    assert jax.tree.structure(restored) == jax.tree.structure(original)
    for got, want, target in zip(jax.tree.leaves(restored), jax.tree.leaves(original), jax.tree.leaves(abstract)):
        assert type(got) is type(want) or isinstance(got, jax.Array)
        if isinstance(target, jax.ShapeDtypeStruct):
            assert got.dtype == want.dtype
            assert got.sharding.is_equivalent_to(target.sharding, got.ndim), (got.sharding, target.sharding)
            assert got.sharding.mesh == target.sharding.mesh
            if jnp.issubdtype(want.dtype, jax.dtypes.prng_key):
                assert jax.random.key_impl(got) == jax.random.key_impl(want)
        np.testing.assert_array_equal(as_numpy(got), as_numpy(want))


def test_round_trip_exact(tmp_path, mesh):
    state = train_state(mesh)
    data = checkpoint_writer.data_iter(3)
    config = {"lr": 1e-2, "model": {"layers": 2}, "name": "tiny"}
    with Checkpoints(tmp_path, save_every=10) as ckpt:
        assert ckpt.latest_step() is None
        assert ckpt.save(20, state, data, config)
        next(data)  # the position is read before `save` returns, even when the arrays are written later
        ckpt.manager.wait_until_finished()
        assert ckpt.latest_step() == 20
        abstract = abstract_of(state, mesh)
        data_back = checkpoint_writer.data_iter(0)
        restored, config_back = ckpt.restore(None, abstract, data_back)
    assert_same(restored, state, abstract)
    assert isinstance(restored["params"], nnx.State)
    assert restored["params"]["w_de"].get_metadata()["axes"] == ("embed", "mlp")
    assert restored["epoch"] == 2 and isinstance(restored["epoch"], int)
    assert data_back.get_state() == {"next_index": 12} and next(data_back) == 12 and config_back == config
    # Each process's data state is a file grain's own Orbax handler reads.
    assert json.loads((tmp_path / "checkpoints/20/data_iter/process_0-of-1.json").read_text()) == {"next_index": 12}
    # The optimizer state came back as an optimizer state: the next update is the same.
    tx = optax.adamw(1e-2)
    grads = jax.tree.map(jnp.ones_like, state["params"])
    want, _ = tx.update(grads, state["opt_state"], state["params"])
    got, _ = tx.update(grads, restored["opt_state"], restored["params"])
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), got, want)


def test_restore_onto_other_shardings_and_without_data(tmp_path, mesh):
    state = train_state(mesh)
    with Checkpoints(tmp_path, save_every=1, async_save=False) as ckpt:
        ckpt.save(3, state, config={})
        # Every array fully replicated this time: the target decides, not what was saved.
        abstract = abstract_of(state, mesh, override=NamedSharding(mesh, P()))
        restored, config_back = ckpt.restore(3, abstract)
    assert_same(restored, state, abstract)
    assert not (tmp_path / "checkpoints/3/data_iter").exists() and config_back == {}


def test_restore_errors_name_the_leaf(tmp_path, mesh):
    state = train_state(mesh)
    with Checkpoints(tmp_path, save_every=1, async_save=False) as ckpt:
        ckpt.save(1, state, config={})
        wrong = abstract_of(state, mesh)
        wrong["params"]["w_de"].set_value(jax.ShapeDtypeStruct((16, 4), jnp.float32, sharding=NamedSharding(mesh, P())))
        with pytest.raises(CheckpointError, match=r"params/w_de/value has shape \(16, 8\)"):
            ckpt.restore(1, wrong)
        extra = dict(abstract_of(state, mesh), ema=jax.ShapeDtypeStruct((2,), jnp.float32, sharding=NamedSharding(mesh, P())))
        with pytest.raises(CheckpointError, match=r"has no ema;"):
            ckpt.restore(1, extra)
        unsharded = abstract_of(state, mesh)
        unsharded["step"] = jax.ShapeDtypeStruct((), jnp.int32)
        with pytest.raises(CheckpointError, match="restore target step has no sharding"):
            ckpt.restore(1, unsharded)
        with pytest.raises(CheckpointError, match="not JSON-serialisable"):
            ckpt.save(2, state, config={"f": print})


def test_keep_and_save_every(tmp_path, mesh):
    state = {"params": {"w": jnp.arange(4.0)}, "step": jnp.int32(0)}
    with Checkpoints(tmp_path, keep=2, save_every=3, async_save=False) as ckpt:
        saved = [s for s in range(1, 11) if ckpt.save(s, state, config={})]
        assert saved == [3, 6, 9]
        assert ckpt.save(10, state, config={}, force=True)  # e.g. the final save
        assert not ckpt.save(10, state, config={}, force=True)  # already complete
        assert sorted(ckpt.manager.all_steps()) == [9, 10]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["10", "9"]


def test_async_save_then_wait(tmp_path, mesh):
    state = train_state(mesh)
    with Checkpoints(tmp_path, keep=3, save_every=1, async_save=True) as ckpt:
        for step in (1, 2, 3, 4):
            state = dict(state, step=jnp.int32(step), params=jax.tree.map(lambda x: x + 1, state["params"]))
            kept = jax.tree.map(lambda x: x.copy() if isinstance(x, jax.Array) else x, state)
            assert ckpt.save(step, state, checkpoint_writer.data_iter(step), {"step": step})
            # A donating train step frees the arrays right after `save` returns: the background
            # write must not need them any more.
            jax.tree.map(lambda x: x.delete() if isinstance(x, jax.Array) else None, state)
            state = kept
        ckpt.manager.wait_until_finished()
        assert sorted(ckpt.manager.all_steps()) == [2, 3, 4] and ckpt.latest_step() == 4
        abstract = abstract_of(state, mesh)
        restored, config = ckpt.restore(None, abstract)
    assert_same(restored, state, abstract)
    assert config == {"step": 4}


def test_init_from_reads_params_only(tmp_path, mesh):
    state = train_state(mesh, seed=1)
    with Checkpoints(tmp_path / "run_a", save_every=5, async_save=False) as ckpt:
        ckpt.save(5, state, config={})
    abstract = abstract_of(state, mesh)["params"]
    params = checkpoint.init_from(tmp_path / "run_a", abstract)
    assert isinstance(params, nnx.State)
    assert_same(params, state["params"], abstract)
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        checkpoint.init_from(tmp_path / "empty", abstract)
    with pytest.raises(CheckpointError, match="has no ema/"):
        checkpoint.init_from(tmp_path / "run_a", abstract, item="ema")


def _biggest_file(step_dir: Path) -> Path:
    """The biggest OCDBT data file (the parameters' bytes)."""
    return max((p for p in step_dir.rglob("*") if p.is_file() and p.parent.name == "d"), key=lambda p: p.stat().st_size)


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _zero(path: Path) -> None:
    path.write_bytes(bytes(path.stat().st_size))


def _edit_data_position(path: Path) -> None:
    """The iterator 4 elements further on: a valid state of the same size."""
    assert json.loads(text := path.read_text()) == {"next_index": 8}
    path.write_text(text.replace("8", "9"))


# Each damages one file of step 2 and returns it.
DAMAGE = {
    "truncated data": lambda d: (p := _biggest_file(d), p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]))[0],
    "deleted data": lambda d: (p := _biggest_file(d), p.unlink())[0],
    "flipped byte in data": lambda d: (p := _biggest_file(d), _flip_a_byte(p))[0],
    "zeroed data": lambda d: (p := _biggest_file(d), _zero(p))[0],
    "edited data position": lambda d: (p := d / "data_iter/process_0-of-1.json", _edit_data_position(p))[0],
    "zeroed _METADATA": lambda d: (p := d / "state/_METADATA", _zero(p))[0],
    "zeroed OCDBT manifest": lambda d: (p := d / "state/manifest.ocdbt", _zero(p))[0],
    "flipped byte in config": lambda d: (p := d / "config/metadata", _flip_a_byte(p))[0],
    "zeroed atlas manifest": lambda d: (p := d / checkpoint.MANIFEST, _zero(p))[0],
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_step_is_skipped_with_a_warning(tmp_path, mesh, caplog, damage):
    states = {s: {"params": {"w": jnp.full((1024,), float(s))}, "step": jnp.int32(s)} for s in (1, 2)}
    with Checkpoints(tmp_path, save_every=1, async_save=False) as ckpt:
        for s, st in states.items():
            ckpt.save(s, st, checkpoint_writer.data_iter(s), {"lr": 0.5})
    manifest = json.loads((tmp_path / "checkpoints/2" / checkpoint.MANIFEST).read_text())
    data_file = tmp_path / "checkpoints/2/data_iter/process_0-of-1.json"
    assert manifest[data_file.relative_to(tmp_path / "checkpoints/2").as_posix()] == {
        "bytes": data_file.stat().st_size, "sha256": hashlib.sha256(data_file.read_bytes()).hexdigest()}
    victim = DAMAGE[damage](tmp_path / "checkpoints/2")

    abstract = abstract_of(states[1], mesh)
    with Checkpoints(tmp_path, save_every=1, async_save=False) as ckpt:
        with caplog.at_level(logging.WARNING, logger="atlas_jax.checkpoint"):
            assert ckpt.latest_step() == 1
        assert str(victim) in caplog.text and "skipping checkpoint step 2" in caplog.text
        # What an uninterrupted run had at step 1: the parameters, the data position, the config.
        data = checkpoint_writer.data_iter(0)
        restored, config = ckpt.restore(None, abstract, data)
        assert_same(restored, states[1], abstract)
        assert data.get_state() == checkpoint_writer.data_iter(1).get_state() and config == {"lr": 0.5}
        with pytest.raises(CheckpointError, match=re.escape(str(victim))):
            ckpt.restore(2, abstract)
        # The resumed run reaches step 2 again: the damaged one is moved aside, not overwritten.
        assert ckpt.save(2, states[2], config={})
        assert ckpt.latest_step() == 2
        restored, _ = ckpt.restore(2, abstract)
        np.testing.assert_array_equal(np.asarray(restored["params"]["w"]), np.full((1024,), 2.0))
    assert (tmp_path / "checkpoints/2.incomplete").is_dir()


def test_nothing_intact_is_an_error_naming_the_files(tmp_path, mesh, caplog):
    with Checkpoints(tmp_path, save_every=1, async_save=False) as ckpt:
        ckpt.save(1, {"w": jnp.ones((64,))}, config={})
    _flip_a_byte(victim := _biggest_file(tmp_path / "checkpoints/1"))
    abstract = {"w": jax.ShapeDtypeStruct((64,), jnp.float32, sharding=NamedSharding(mesh, P()))}
    with Checkpoints(tmp_path, async_save=False) as ckpt, caplog.at_level(logging.WARNING):
        with pytest.raises(CheckpointError, match="no complete checkpoint"):
            ckpt.restore(None, abstract)
    assert f"{victim} does not match its checksum" in caplog.text


def _start_writer(workdir, *args):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    env.pop("XLA_FLAGS", None)
    return subprocess.Popen(
        [sys.executable, str(WRITER), str(workdir), *args],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
    )


def _read_until(proc, prefix: str, count: int = 1) -> list[str]:
    lines = []
    while sum(line.startswith(prefix) for line in lines) < count:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"writer exited (rc={proc.poll()}) before printing {prefix!r}: {lines[-5:]}")
        lines.append(line.strip())
    return lines


def _writing_arrays(tmp: Path) -> bool:
    """Whether array data files (Orbax OCDBT `d/` chunks) have appeared under a save's tmp dir."""
    try:
        return any(p.parent.name == "d" and p.is_file() for p in tmp.rglob("*"))
    except FileNotFoundError:  # renamed while we looked
        return False


def test_sigkill_mid_save_resumes_from_last_complete(tmp_path, mesh):
    size = 16_000_000  # 64 MB of random float32: a save takes a fraction of a second
    for attempt in range(3):  # the kill must land while a tmp dir is being written; retry if it missed
        workdir = tmp_path / f"run{attempt}"
        root = workdir / "checkpoints"
        proc = _start_writer(workdir, "--size", str(size))
        try:
            _read_until(proc, "saved", 2)  # two complete steps, the third one being saved
            partial, deadline = None, time.time() + 60
            while partial is None and time.time() < deadline:
                for tmp in root.glob("*.orbax-checkpoint-tmp*"):
                    if _writing_arrays(tmp):
                        partial = tmp
                        break
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
        finally:
            proc.kill()
            proc.stdout.close()
        assert partial is not None, "no save in progress seen"
        if partial.exists():  # killed before the commit (rename)
            break
    else:
        pytest.fail("three SIGKILLs all landed after the commit")

    killed_step = int(partial.name.split(".")[0])
    assert not (root / str(killed_step)).exists() and not (partial / checkpoint.MANIFEST).exists()
    last = killed_step - 1
    abstract = abstract_of(checkpoint_writer.make_state(last, size), mesh)
    with Checkpoints(workdir, save_every=1, async_save=False) as ckpt:
        assert ckpt.latest_step() == last
        data = checkpoint_writer.data_iter(0)
        restored, config = ckpt.restore(None, abstract, data)
        want = checkpoint_writer.make_state(last, size)
        assert_same(restored, want, abstract)
        assert data.get_state() == checkpoint_writer.data_iter(last).get_state() and config == {"size": size}
        # The resumed run saves the killed step again; the stale tmp dir is cleaned up.
        assert ckpt.save(killed_step, checkpoint_writer.make_state(killed_step, 8), config={})
        assert ckpt.latest_step() == killed_step
    assert not partial.exists()


def test_sigterm_sets_the_flag_and_does_not_kill(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    with Checkpoints(tmp_path) as ckpt:
        assert not ckpt.reached_preemption(1)
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(100):  # the handler runs between bytecodes of the main thread
            if ckpt.reached_preemption(2):
                break
            time.sleep(0.01)
        assert ckpt.reached_preemption(3)
    assert signal.getsignal(signal.SIGTERM) is before  # put back by close()


def test_sigterm_subprocess_saves_and_exits(tmp_path, mesh):
    proc = _start_writer(tmp_path, "--size", "64", "--save-every", "5", "--async-save", "--step-seconds", "0.05")
    try:
        _read_until(proc, "step", 7)  # past the save at step 5
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    stopped = int(out.strip().splitlines()[-1].split()[-1])
    assert out.strip().splitlines()[-1] == f"stopped {stopped}" and stopped >= 7
    with Checkpoints(tmp_path, async_save=False) as ckpt:
        assert ckpt.latest_step() == stopped
        abstract = abstract_of(checkpoint_writer.make_state(stopped, 64), mesh)
        data = checkpoint_writer.data_iter(0)
        restored, _ = ckpt.restore(None, abstract, data)
    assert_same(restored, checkpoint_writer.make_state(stopped, 64), abstract)
    assert data.get_state() == checkpoint_writer.data_iter(stopped).get_state()


def test_grain_handler_reads_our_data_state(tmp_path):
    """The data item is grain's own format: grain's Orbax handler restores a real iterator from it."""
    ds = grain.MapDataset.range(100).shuffle(seed=3).to_iter_dataset()
    it = iter(ds)
    for _ in range(7):
        next(it)
    with Checkpoints(tmp_path, save_every=1, async_save=False) as ckpt:
        ckpt.save(1, {"step": jnp.int32(1)}, it, {})
    fresh = iter(ds)
    grain.checkpoint.CheckpointHandler().restore(
        epath.Path(tmp_path / "checkpoints/1/data_iter"), args=grain.checkpoint.CheckpointRestore(fresh)
    )
    assert [next(fresh) for _ in range(5)] == [next(it) for _ in range(5)]


class NamedState(NamedTuple):  # the trainer's TrainState shape: fields name the items
    step: jax.Array
    params: nnx.State
    opt_state: object
    rng: jax.Array


def test_namedtuple_state_with_raw_key(tmp_path, mesh):
    params = nnx.split(sharding.sharded_init(lambda: Tiny(nnx.Rngs(4)), mesh))[1]
    state = NamedState(jnp.int32(9), params, optax.adam(1e-3).init(params), jax.random.PRNGKey(4))
    with Checkpoints(tmp_path, save_every=9, async_save=False) as ckpt:
        assert ckpt.save(9, state, config={})
        assert sorted(p.name for p in (tmp_path / "checkpoints/9").iterdir() if p.is_dir()) == ["config", "state"]
        abstract = abstract_of(state, mesh)
        restored, _ = ckpt.restore(9, abstract)
    assert isinstance(restored, NamedState)
    assert_same(restored, state, abstract)
