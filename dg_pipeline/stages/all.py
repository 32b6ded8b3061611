"""stage=all: the registry's stages in order: base -> [pretrain] -> sft (gate) -> per quant.formats entry:
quantize (gate) -> export (check + gate) (core.registry says which rows, in which order, with which extra keys).

Each step is what its own command line would run: this run's overrides plus the step's (`stage=quantize
quant=nvfp4 input=<sft/model>`, ...), composed by Hydra, so a `quant.kv_cache=fp8` on the command line reaches every
format while each format keeps its own conf/quant/<fmt>.yaml. A step is skipped by the registry's one rule
(core.registry.REUSE): its output exists, its gate record passed, and its fingerprint (the config groups it reads +
its input's fingerprint, chained through the steps) is unchanged; otherwise it says why it runs. `force=true` reruns
everything (training from scratch). A step whose output exists but is stale is rebuilt (force=true for that step);
one whose output is missing (e.g. sft killed mid-training) runs without force, so its training resumes. Fingerprints
live in <run_dir>/.dg_state/. Every rank walks the chain; each stage's registry row says where its work runs
(stages/__init__.py), and the bookkeeping (state files, summary, table) is rank 0's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from omegaconf import DictConfig, OmegaConf

from dg_pipeline.core.fingerprint import stage_fingerprint
from dg_pipeline.core.io import atomic_write_json, gate_records, read_json
from dg_pipeline.core.ranks import is_rank_zero
from dg_pipeline.core.registry import REUSE, STAGES, decide_reuse
from dg_pipeline.core.rundir import RunDir
from dg_pipeline.settings import RunSettings, compose

STAGE = "all"
# Keys each step sets itself; the run's own values for them do not reach the steps.
STEP_KEYS = ("stage", "run_dir", "input", "force", "quant",
             *(override.split("=")[0] for spec in STAGES.values() for override in spec.all_overrides))


@dataclass
class PlannedStage:
    stage: str
    variant: str | None
    overrides: list[str]  # the command line (after `python -m dg_pipeline`) that runs this step alone
    cfg: DictConfig  # what that command line composes
    output: Path
    upstream: "PlannedStage | None"
    fingerprint: str = field(default="")

    @property
    def label(self) -> str:
        return f"{self.stage}[{self.variant}]" if self.variant else self.stage


def run_overrides(overrides: Sequence[str] | None = None) -> list[str]:
    """This run's command-line overrides (Hydra's record of them), less the keys each step sets itself."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if overrides is None:
        overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    return [o.input_line for o in parsed if o.key_or_group not in STEP_KEYS]


def plan(cfg: DictConfig, overrides: Sequence[str] | None = None) -> list[PlannedStage]:
    """The steps of stage=all for `cfg` (`overrides`: its command line; None = Hydra's record of it): the registry's
    stage=all rows in order (an optional one only when its count is > 0), the per-variant rows once per
    quant.formats entry, each step starting from its upstream step's output."""
    settings = RunSettings.from_cfg(cfg)
    rd = RunDir.from_cfg(cfg)
    common = [*run_overrides(overrides), f"run_dir={rd.root}"]
    rows = [s for s in STAGES.values() if s.in_all and (not s.optional or OmegaConf.select(cfg, s.enabled_by) > 0)]
    steps: list[PlannedStage] = []

    def add(spec, upstream: PlannedStage | None, variant: str | None = None, *extra: str) -> PlannedStage:
        # Rebuild a stale output; a missing one (an interrupted stage) is built, resuming its training.
        force = settings.force or rd.output(spec.name, variant).exists()
        step_overrides = [*common, f"stage={spec.name}", f"force={str(force).lower()}", *extra,
                          *([f"input={upstream.output}"] if upstream else []),
                          *(o.format(variant=variant) for o in spec.all_overrides)]
        step_cfg = compose(step_overrides)
        step = PlannedStage(spec.name, variant, step_overrides, step_cfg, rd.output(spec.name, variant), upstream)
        step.fingerprint = stage_fingerprint(step_cfg, spec.name, upstream.fingerprint if upstream else "")
        steps.append(step)
        return step

    upstream = None
    for spec in (s for s in rows if not s.per_variant):
        upstream = add(spec, upstream)
    for fmt in settings.quant.formats:
        variant, previous = settings.calib.output_name(fmt), upstream
        for spec in (s for s in rows if s.per_variant):
            previous = add(spec, previous, variant, f"quant={fmt}")
    return steps


def state_file(rd: RunDir, step: PlannedStage) -> Path:
    return rd.root / ".dg_state" / f"{step.stage}{'-' + step.variant if step.variant else ''}.json"


def is_up_to_date(rd: RunDir, step: PlannedStage) -> bool:
    return reuse(rd, step, force=False).skip


def reuse(rd: RunDir, step: PlannedStage, force: bool):
    f = state_file(rd, step)
    recorded = read_json(f).get("fingerprint") if f.exists() else None
    gate = STAGES[step.stage].gate_record_path(rd.root, step.variant)
    gate_record = read_json(gate) if gate is not None and gate.is_file() else None
    return decide_reuse(REUSE, step.output, force=force, gate_record=gate_record, fingerprint=step.fingerprint,
                        recorded_fingerprint=recorded)


def run(cfg: DictConfig, run_step: Callable[[DictConfig, str | None], dict]) -> dict:
    """Plan, then run each step through `run_step(step_cfg, variant)` (the CLI's tracked runner)."""
    rd = RunDir.from_cfg(cfg)
    steps = plan(cfg)
    rank_zero = is_rank_zero()
    say = print if rank_zero else (lambda *_args, **_kwargs: None)
    say(f"stage=all into {rd.root}: " + " -> ".join(s.label for s in steps))
    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    for step in steps:
        decision = reuse(rd, step, force=bool(cfg.force))
        if decision.skip:
            say(f"[all] {step.label}: up to date (fingerprint {step.fingerprint}), skipped")
            timings[step.label] = 0.0
            continue
        say(f"\n[all] ===== {step.label} ===== ({decision.reason})")
        t0 = time.perf_counter()
        run_step(step.cfg, step.variant)
        timings[step.label] = round(time.perf_counter() - t0, 1)
        if rank_zero:
            atomic_write_json(state_file(rd, step), {"fingerprint": step.fingerprint, "stage": step.label})
    summary = {"run_dir": str(rd.root), "seconds": round(time.perf_counter() - t_all, 1), "stages": timings}
    if rank_zero:
        atomic_write_json(rd.root / STAGE / "summary.json", summary)
        _print_final_table(rd)
    say(f"\n[all] done in {summary['seconds']} s; outputs under {rd.root}")
    return summary


def _print_final_table(rd: RunDir) -> None:
    from dg_pipeline.verify import print_stage_table

    records = gate_records(rd.root)
    if records:
        print_stage_table(records)
