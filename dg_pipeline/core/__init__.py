"""Small shared pieces every component uses: errors, atomic file writes, run-directory layout, JSON records."""

from dg_pipeline.core.errors import GateFailed, InputError, PipelineError
from dg_pipeline.core.io import atomic_dir, atomic_write_json, atomic_write_text, read_json
from dg_pipeline.core.rundir import RunDir

__all__ = [
    "PipelineError",
    "InputError",
    "GateFailed",
    "atomic_dir",
    "atomic_write_json",
    "atomic_write_text",
    "read_json",
    "RunDir",
]
