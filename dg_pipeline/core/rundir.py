"""The run-directory layout: every stage writes under <run_dir>/<stage>/ (rule 6: never into git)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dg_pipeline.core.errors import InputError

# Which stage produces the input of which stage, and the key that overrides it.
PROVIDERS = {
    "pretrain": "base",
    "sft": "base",
    "eval": "sft",
    "quantize": "sft",
    "export": "quantize",
    "check": "export",
}


@dataclass(frozen=True)
class RunDir:
    root: Path

    @classmethod
    def from_cfg(cls, cfg) -> "RunDir":
        return cls(Path(str(cfg.run_dir)).expanduser().resolve())

    def stage(self, name: str) -> Path:
        return self.root / name

    def model_dir(self, stage: str) -> Path:
        return self.root / stage / "model"

    def verify_json(self, stage: str) -> Path:
        return self.root / stage / "verify.json"

    def data_dir(self) -> Path:
        return self.root / "data"

    def resolve_input(self, stage: str, explicit: str | None, default: Path | None = None) -> Path:
        """The directory a stage starts from: `input=` if given, else its provider stage's output.

        A missing input names the stage or key that provides it.
        """
        if explicit:
            p = Path(str(explicit)).expanduser().resolve()
            if not p.exists():
                raise InputError(f"input={explicit}: directory not found (stage={stage} starts from it)")
            return p
        provider = PROVIDERS.get(stage)
        p = default if default is not None else (self.model_dir(provider) if provider else None)
        if p is None or not p.exists():
            raise InputError(
                f"stage={stage} needs {p}, which does not exist: run `stage={provider} run_dir={self.root}` "
                f"first, or pass input=<dir>"
            )
        return p
