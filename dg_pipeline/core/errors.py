"""Errors the pipeline raises on purpose. Each message names the file/key at fault and the fix."""


class PipelineError(RuntimeError):
    """Base class: an error the user can act on (printed without a traceback by the entry point)."""


class InputError(PipelineError):
    """Bad user input: a file, a row, a config key. The message names where and how to fix it."""


class GateFailed(PipelineError):
    """A verification gate check failed; verify.json was still written with passed=false."""


class TrainingDiverged(PipelineError):
    """Training reached a non-finite loss or gradient norm; nothing was saved."""
