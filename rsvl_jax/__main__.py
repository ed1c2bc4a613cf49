"""`python -m rsvl_jax`: the version, the commands, and the allocator a command runs with."""
import os

from rsvl_jax import __version__, allocator

COMMANDS = ("train", "evaluate", "caption", "search", "export", "convert", "data.builders")

print(f"rsvl_jax {__version__}: python -m rsvl_jax.<{'|'.join(COMMANDS)}> --help")
print(f"allocator: {allocator.loaded_allocator()} (child processes get LD_PRELOAD={os.environ.get('LD_PRELOAD', '')!r})")
