"""Test-wide set-up: 8 fake CPU devices so sharded code runs without an accelerator."""

import os

# Must happen before jax initialises its backends.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_enable_x64", False)
# Re-runs (and CI on the same machine) reuse compiled programs.
jax.config.update("jax_compilation_cache_dir", os.path.expanduser("~/.cache/atlas_jax/jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

from absl import flags  # noqa: E402

# Grain's multiprocess paths read absl flags.
flags.FLAGS.mark_as_parsed()
