"""rsvl_jax: remote-sensing vision-language models in JAX + Flax NNX."""
from rsvl_jax import allocator

if allocator.launched_as_command():  # `python -m rsvl_jax.<command>`: before JAX is imported
    allocator.use_jemalloc()

import flax  # noqa: E402

# Parameters carry *logical* axis names as metadata; parallel.py maps them to mesh axes when
# the state is placed. Eager sharding at construction would need a mesh inside every model
# constructor, so we turn it off once here.
flax.config.update("flax_always_shard_variable", False)

__version__ = "0.1.0"
