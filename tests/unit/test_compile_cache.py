"""The persistent compile cache: a second process with the same `compile_cache_dir` loads the
executable the first one compiled instead of compiling it; "" turns the cache off."""
import json
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]

SCRIPT = """
import json, sys
import jax, jax.numpy as jnp
from rsvl_jax import parallel
hits = []
jax.monitoring.register_event_listener(lambda name, **kw: hits.append(name) if name.endswith("cache_hits") else None)
where = parallel.enable_compile_cache(sys.argv[1])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # cache even this tiny function
f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum() * 3.0)
print(json.dumps({"value": float(f(jnp.ones((8, 8)))), "hits": len(hits), "dir": where}))
"""


def _run(cache_dir):
    out = subprocess.run([sys.executable, "-c", SCRIPT, cache_dir], cwd=REPO, capture_output=True, text=True,
                         timeout=300, env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_second_process_finds_the_cached_executable(tmp_path):
    first = _run(str(tmp_path / "xla"))
    assert first["hits"] == 0 and any((tmp_path / "xla").iterdir())
    second = _run(str(tmp_path / "xla"))
    assert second["hits"] >= 1 and second["value"] == first["value"]


def test_an_empty_directory_turns_the_cache_off(tmp_path):
    assert _run("")["dir"] is None
