"""Entry point: `python -m dg_pipeline stage=<stage> recipe=<recipe> run_dir=<dir> [overrides]`.

It composes the Hydra config (conf/ + recipes/), settles the run dir every rank of a multi-process run shares
(rank 0's, dg_pipeline.core.ranks), and dispatches to one stage module.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Keep third-party start-up quiet and offline: no telemetry, no hub look-ups (weights and data are local only).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
# W&B prints a page per run; tracking.py prints one line per stage instead.
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from nemo.core.config import hydra_runner  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from dg_pipeline.settings import CONF_DIR  # noqa: E402


@hydra_runner(config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> None:
    from omegaconf import open_dict

    from dg_pipeline.core.errors import PipelineError
    from dg_pipeline.core.ranks import agree_on_run_dir, init_launched_group
    from dg_pipeline.stages import run_stage

    try:
        init_launched_group(str(cfg.get("device", "auto")))
        with open_dict(cfg):
            cfg.run_dir = agree_on_run_dir(str(Path(str(cfg.run_dir)).expanduser().resolve()))
        run_stage(cfg)
    except PipelineError as e:
        # One clear line for errors the user can fix; tracebacks are for bugs.
        fail(str(e))
    except KeyboardInterrupt:
        fail("interrupted (Ctrl-C): nothing was left half-written (every output is written under a temporary name "
             "and renamed once complete); rerun the same command to continue (training resumes from its last "
             "checkpoint)", code=EXIT_INTERRUPTED, prefix="")
    except Exception as e:
        full = disk_full(e)
        if full is None:
            raise
        where = f" while writing {full.filename}" if getattr(full, "filename", None) else ""
        fail(f"no space left on device{where} (under run_dir={cfg.run_dir}): free some space (df -h "
             f"{cfg.run_dir}) and rerun the same command; nothing was left half-written (outputs are renamed into "
             "place only once complete)")


EXIT_INTERRUPTED = 130  # the shell's code for a process stopped by SIGINT


def fail(message: str, code: int = 1, prefix: str = "error: ") -> None:
    print(f"\n{prefix}{message}", file=sys.stderr)
    sys.exit(code)


def disk_full(error: BaseException) -> BaseException | None:
    """The exception in `error`'s chain that says the disk is full (ENOSPC; a library may wrap it in its own
    error, e.g. safetensors' "No space left on device (os error 28)"), or None."""
    import errno

    e = error
    while e is not None:
        if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left on device" in str(e):
            return e
        e = e.__cause__ or e.__context__
    return None


def check_arguments(argv: list[str]) -> None:
    """A bad override (unknown key, wrong type, unknown option) fails here in one line, before any work."""
    from dg_pipeline.core.errors import InputError
    from dg_pipeline.settings.command_line import check_command_line

    if any(a.startswith("-") for a in argv):
        return  # Hydra's own flags (--help, -m, ...): Hydra handles the command line
    try:
        check_command_line(argv)
    except InputError as e:
        fail(str(e))


if __name__ == "__main__":
    check_arguments(sys.argv[1:])
    main()
