"""The run-directory layout: every stage writes under <run_dir>/<stage>/ (checkpoints and data never go into git)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dg_pipeline.core.errors import InputError
from dg_pipeline.core.registry import STAGES, provider_of


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

    def output(self, stage: str, variant: str | None = None) -> Path | None:
        """Where `stage` writes (the registry's layout)."""
        return STAGES[stage].output_dir(self.root, variant)

    def verify_json(self, stage: str) -> Path:
        return self.root / stage / "verify.json"

    def data_dir(self) -> Path:
        return self.root / "data"

    def provider(self, stage: str) -> str | None:
        """The stage whose output `stage` starts from in this run dir (an optional provider that did not run, e.g.
        pretrain, is passed over)."""
        return provider_of(stage, lambda name: self.output(name).exists())

    def resolve_input(self, stage: str, explicit: str | None, default: Path | None = None) -> Path:
        """The directory a stage starts from: `input=` if given, else `default`, else its provider's output.

        A missing input names the stage or key that provides it.
        """
        if explicit:
            p = Path(str(explicit)).expanduser().resolve()
            if not p.exists():
                raise InputError(f"input={explicit}: directory not found (stage={stage} starts from it)")
            return p
        provider = self.provider(stage)
        p = default if default is not None else (self.output(provider) if provider else None)
        if p is None or not p.exists():
            raise InputError(
                f"stage={stage} needs {p}, which does not exist: run `stage={provider} run_dir={self.root}` "
                f"first, or pass input=<dir>"
            )
        return p
