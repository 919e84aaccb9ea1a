"""The TPU compile check: the tiny config's SFT and LA-GRPO programs compile for a v5e 2x2 slice
(compile-only devices from libtpu, no TPU) and fit; its figures and its one-line errors."""

import importlib.util
import json
import os

import jax
import pytest

from atlas_jax import compile_check

TOPOLOGY = "v5e:2x2"
HBM = 16 * 2**30


def config(name: str, arg: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(os.path.dirname(__file__), "..", "configs", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)


def small(c):
    """The tiny model on short sequences: compile time on a CI machine stays low."""
    c.data.batch_size = 4
    c.data.max_length = 64
    c.eval.batch_size = 4
    return c


@pytest.fixture(scope="module", autouse=True)
def low_compile_effort():
    # Less XLA optimisation effort: the same programs, compiled in about 2/3 of the time.
    jax.config.update("jax_exec_time_optimization_effort", -1.0)
    yield
    jax.config.update("jax_exec_time_optimization_effort", 0.0)


@pytest.fixture(scope="module")
def sft_report(tmp_path_factory):
    c = small(config("sft_synthetic", "module"))
    c.eval.num_per_task = 0  # the sampler program is compiled by the LA-GRPO check below
    path = tmp_path_factory.mktemp("compile_check") / "sft.json"
    status = compile_check.run(c, TOPOLOGY, json_path=str(path))
    return status, json.loads(path.read_text())


def test_sft_step_compiles_and_fits_with_its_figures_in_json(sft_report):
    status, report = sft_report
    assert status == 0
    assert report["topology"] == TOPOLOGY
    (row,) = report["programs"]
    assert row["name"] == "train_step"
    for key in ("name", "fits", "headroom", "total_bytes", "hbm_bytes", "compile_s", "flops", "est_step_s", "est_mfu", "collectives"):
        assert key in row
    m = row["memory"]
    assert row["total_bytes"] == m["argument"] + m["output"] + m["temp"] - m["alias"] > 0
    assert row["hbm_bytes"] == HBM and row["fits"]
    assert row["headroom"] == pytest.approx(1 - row["total_bytes"] / HBM)
    # Per chip, XLA counts about a quarter of the model's FLOPs (4 chips, no rematerialisation).
    assert 0.2 < row["flops"] / row["model_flops"] < 0.4
    assert row["est_step_s"] > 0 and 0 < row["est_mfu"] <= 1
    # Pure data parallelism: the gradients' all-reduce, no gathered parameter or logits.
    assert row["collectives"]["all-reduce"]["count"] >= 1
    assert row["collectives"]["flagged_all_gathers"] == []


def test_la_grpo_sampler_and_update_compile_and_fit():
    c = small(config("la_grpo_synthetic", "la_grpo,vocab"))
    c.rl.prompts_per_step = 4
    c.rl.group_size = 2
    c.rl.sample.max_new_tokens = 16
    c.rl.anchor_share = False
    c.model.remat = "full"  # as in the pod configs: the decode loop must lower with it too
    rows = compile_check.check(c, TOPOLOGY)
    assert [r["name"] for r in rows] == ["sampler", "update_step"]
    assert all(r["fits"] and 0.9 < r["headroom"] < 1 for r in rows)
    sampler, update = rows
    assert sampler["est_mfu"] is None  # a decode loop's cost counts one pass
    assert 0 < update["est_mfu"] <= 1


def test_la_grpo_micro_batch_whose_prompts_cannot_be_sharded_gets_no_estimate_not_an_error():
    """The cost variant runs one micro-batch's prompts through the sampler: 4 rollouts in groups
    of 2 are 2 prompts, which 4 chips cannot shard (as 8 prompts on 32 v5p chips)."""
    c = small(config("la_grpo_synthetic", "la_grpo,vocab"))
    c.rl.prompts_per_step, c.rl.group_size, c.rl.micro_batch = 8, 2, 4
    c.rl.sample.max_new_tokens = 16
    c.rl.anchor_share = False
    c.model.scan_layers = True  # repeated loops: an estimate would need the loop-free variants
    sampler, update = compile_check.check(c, TOPOLOGY)
    assert update["fits"] and update["repeated_loops"] > 0 and update["est_mfu"] is None


def test_auto_attention_compiles_the_splash_kernel_for_tpu():
    """model.attention='auto' follows the mesh's devices, not this CPU host: the programs above
    run the splash kernel (a Mosaic custom call in the lowered step, not the interpreter)."""
    from atlas_jax import builders

    c = small(config("sft_synthetic", "module"))
    c.eval.num_per_task = 0
    devices, _ = compile_check.topology_devices(TOPOLOGY)
    mesh = builders.make_mesh(c, devices)
    model_cfg = compile_check.shape_model_config(c, mesh)
    assert c.model.attention == "auto" and model_cfg.attention == "splash"
    (step,) = compile_check.sft_programs(c, model_cfg, mesh)
    assert "tpu_custom_call" in step.lower().as_text()


def test_depth_design_and_linear_extrapolation():
    # 7B: 28 decoder layers, 28 window-attention and 4 full-attention vision blocks.
    design = compile_check.depth_design((28, 28, 4))
    assert design == [(1, 1, 1), (2, 1, 1), (1, 2, 1), (1, 1, 2)]
    assert compile_check.depth_design((4, 1, 1)) == [(1, 1, 1), (2, 1, 1)]  # tiny: one vision block of each kind

    def cost(n):  # costs linear in the layer counts, two figures each
        return [5.0 + 3.0 * n[0] + 2.0 * n[1] + 7.0 * n[2], 1.0 + 0.5 * n[0] + 0.25 * n[1] + 4.0 * n[2]]

    figures = [cost(d) for d in design]
    assert compile_check.extrapolate(design, figures, (28, 28, 4)) == pytest.approx(cost((28, 28, 4)))


@pytest.mark.slow
def test_estimate_of_scanned_layers_matches_the_unrolled_compile():
    """XLA counts a scanned body once: the check compiles the step unrolled at 1 and 2 decoder
    layers and extrapolates to the tiny model's 4; that must equal the cost analysis of the
    4-layer step compiled unrolled."""

    def rows(scan: bool):
        c = small(config("sft_synthetic", "module"))
        c.eval.num_per_task = 0
        c.model.scan_layers, c.model.remat = scan, "full"
        (row,) = compile_check.check(c, TOPOLOGY)
        return row

    scanned, unrolled = rows(True), rows(False)
    assert scanned["repeated_loops"] > 0 and unrolled["repeated_loops"] == 0
    assert unrolled["estimate"]["method"] == "XLA cost model"
    est, ref = scanned["estimate"], unrolled["estimate"]
    assert "2 loop-free compiles" in est["method"]
    assert scanned["flops"] < 0.8 * est["flops"]  # the scanned program's own count misses 3 of 4 layers
    for key in ("flops", "bytes", "xla_s"):
        assert est[key] == pytest.approx(ref[key], rel=1e-3), key
    assert scanned["est_mfu"] == pytest.approx(unrolled["est_mfu"], rel=1e-3)
    # The splash kernels' FLOPs, charged at peak on top of XLA's figures.
    assert est["kernel_s"] > 0 and scanned["est_step_s"] == pytest.approx(est["xla_s"] + est["kernel_s"])


@pytest.mark.slow
def test_cost_variants_apply_the_output_head_in_one_chunk():
    """Sequences longer than `token_logprobs.CHUNK`: the job's step (layers unrolled) loops over
    the output head's chunks, which XLA's cost model would count once; the cost variants pass the
    whole sequence as the step's `head_chunk`, and the estimate equals XLA's cost analysis of the
    4-layer step built with that chunk (no loop left)."""
    from atlas_jax import builders
    from atlas_jax.train import sft, token_logprobs

    c = small(config("sft_synthetic", "module"))
    c.eval.num_per_task = 0
    c.data.max_length = 2 * token_logprobs.CHUNK + 64  # three chunks
    c.model.scan_layers, c.model.remat = False, "full"
    (row,) = compile_check.check(c, TOPOLOGY)
    assert row["repeated_loops"] > 0 and "2 loop-free compiles" in row["estimate"]["method"]

    devices, chip = compile_check.topology_devices(TOPOLOGY)
    mesh = builders.make_mesh(c, devices)
    model_cfg = compile_check.shape_model_config(c, mesh)
    graphdef, tx, schedule, state, state_sh = compile_check.abstract_state(c, model_cfg, mesh, total_steps=c.train.steps)
    batch = compile_check.abstract_batch(c, model_cfg, mesh, fmt="sft", batch_size=c.data.batch_size)
    assert batch["input_ids"].shape[1] > token_logprobs.CHUNK
    step = sft.make_train_step(graphdef, tx, state_sharding=state_sh, batch_sharding={k: v.sharding for k, v in batch.items()},
                               lr_schedule=schedule, train=builders.trainable(c), head_chunk=batch["input_ids"].shape[1])
    with jax.set_mesh(mesh):
        compiled = step.lower(state, batch).compile()
    assert compile_check.repeated_loops(compiled.as_text()) == 0
    ref = dict(zip(("flops", "bytes", "xla_s"), compile_check.xla_cost(compiled, chip)))
    for key in ("flops", "bytes", "xla_s"):
        assert row["estimate"][key] == pytest.approx(ref[key], rel=1e-3), key


def test_advice_names_the_overflow_and_the_knobs(sft_report):
    row = dict(sft_report[1]["programs"][0], total_bytes=HBM + 2**30, fits=False)
    msg = compile_check.advice(row, small(config("sft_synthetic", "module")))
    assert msg.startswith("train_step does not fit: 17.00 GiB per chip > 16.00 GiB HBM (over by 1.00 GiB)")
    assert "data.batch_size" in msg and "optim.grad_accum" in msg and "model.remat='full'" in msg


def test_a_program_xla_refuses_for_lack_of_hbm_is_a_row_not_a_traceback():
    error = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (45.89G) "
             "exceeds available HBM (15.75G).")
    program = compile_check.Program("update_step", lambda: None, 1e15)
    row = compile_check._out_of_memory_row(program, compile_check.CHIPS["v5e"], error, 12.0)
    assert not row["fits"] and row["out_of_memory"]
    assert row["total_bytes"] == row["memory"]["temp"] == int(45.89 * 2**30)
    c = small(config("la_grpo_synthetic", "la_grpo,vocab"))
    msg = compile_check.advice(row, c)
    assert msg.startswith("update_step does not fit: 45.89 GiB its temporaries alone (XLA refused to compile it) > 16.00 GiB HBM")
    assert "rl.prompts_per_step" in msg
    # The update step's own knob: micro-batches (the synthetic config's rollouts, 8 x 8, in one pass).
    assert c.rl.micro_batch == 0 and c.rl.prompts_per_step * c.rl.group_size == 64
    assert "a smaller rl.micro_batch (rollouts per forward/backward pass, now 64;" in msg
    assert "rl.anchor_share=False" in msg
    sampler_msg = compile_check.advice(dict(row, name="sampler"), small(config("la_grpo_synthetic", "la_grpo,vocab")))
    assert "rl.micro_batch" not in sampler_msg and "rl.prompts_per_step" in sampler_msg
    assert compile_check._out_of_memory_row(program, compile_check.CHIPS["v5e"], "INTERNAL: something else", 1.0) is None


def test_a_cost_variant_xla_refuses_for_lack_of_hbm_is_no_estimate_not_a_traceback():
    """Found on v4-32 (LA-GRPO, rl.micro_batch=128): the variant's head over the whole sequence at
    once needed 44.42G of temporaries; the check then has no estimate but keeps the program's row."""

    class Refused:
        def __init__(self, error):
            self.error = error

        def compile(self, compiler_options=None):
            raise jax.errors.JaxRuntimeError(self.error)

    oom = "RESOURCE_EXHAUSTED: the total memory required for HLO temporaries (44.42G) exceeds available HBM (30.75G)."
    loop_free = compile_check.LoopFree([(1, 1, 1)], [lambda: Refused(oom)], (4, 1, 1))
    with pytest.raises(compile_check.CompileCheckError, match=r"layer counts \(1, 1, 1\) does not fit the chip: 44.42G"):
        compile_check.loop_free_cost(loop_free, compile_check.CHIPS["v4"])
    other = compile_check.LoopFree([(1, 1, 1)], [lambda: Refused("INTERNAL: something else")], (4, 1, 1))
    with pytest.raises(jax.errors.JaxRuntimeError):
        compile_check.loop_free_cost(other, compile_check.CHIPS["v4"])


@pytest.mark.parametrize(
    "topology, mesh, expected",
    [
        ("v9:2x2", (-1, 1, 1), "unknown topology 'v9:2x2': expected GENERATION:DIMS"),
        ("v5e:two", (-1, 1, 1), "unknown topology 'v5e:two'"),
        ("v5e:3x3", (-1, 1, 1), "topology 'v5e:3x3': INVALID_ARGUMENT"),
        (TOPOLOGY, (3, 1, 1), "config does not fit topology v5e:2x2 (4 chips): config.mesh=(3, 1, 1)"),
    ],
)
def test_bad_topology_or_mesh_is_one_line(topology, mesh, expected, capsys):
    c = config("sft_synthetic", "module")
    c.mesh = mesh
    assert compile_check.run(c, topology) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("compile_check: " + expected)
    assert "\n" not in err and "Traceback" not in err
