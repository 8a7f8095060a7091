"""Small helpers shared by every stage: atomic file writes and command-line error handling."""

from ichseg.utils.atomic import atomic_path, atomic_write_bytes, atomic_write_text
from ichseg.utils.cli import run_cli

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "run_cli"]
