"""stage=all: base -> [pretrain] -> sft (gate) -> quantize per format (gate) -> export per format (check + gate).

A stage is skipped when its output exists and its fingerprint (the config keys it reads + its input's
fingerprint) is unchanged; `force=true` reruns everything (training from scratch). A stage whose output is missing
(e.g. sft killed mid-training) is rerun without force, so its training resumes. Fingerprints live in
<run_dir>/.dg_state/. Every rank walks the chain; each stage decides where its work runs (stages/__init__.py), and
the bookkeeping (state files, summary, table) is rank 0's.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from dg_pipeline.core.fingerprint import stage_fingerprint
from dg_pipeline.core.io import atomic_write_json
from dg_pipeline.core.ranks import is_rank_zero
from dg_pipeline.core.rundir import RunDir
from dg_pipeline.stages.quantize import output_name

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


@dataclass
class PlannedStage:
    stage: str
    variant: str | None
    cfg: DictConfig
    output: Path
    upstream: "PlannedStage | None"
    fingerprint: str = ""

    @property
    def label(self) -> str:
        return f"{self.stage}[{self.variant}]" if self.variant else self.stage


def quant_group_file(fmt: str) -> Path:
    group_file = CONF_DIR / "quant" / f"{fmt}.yaml"
    if not group_file.exists():
        from dg_pipeline.core.errors import InputError

        choices = sorted(p.stem for p in (CONF_DIR / "quant").glob("*.yaml"))
        raise InputError(f"quant.formats contains '{fmt}': no conf/quant/{fmt}.yaml; choose from {choices}")
    return group_file


def quant_overrides(cfg: DictConfig) -> dict:
    """The quant.* values this run sets over its composed quant group (on the command line or in the recipe), e.g.
    quant.kv_cache=fp8: they apply to every format of quant.formats, as `quant=<fmt> quant.kv_cache=fp8` would."""
    composed = OmegaConf.to_container(OmegaConf.load(quant_group_file(str(cfg.quant.name))), resolve=True)
    current = OmegaConf.to_container(cfg.quant, resolve=True)
    return {k: v for k, v in current.items() if k not in ("name", "formats") and composed.get(k) != v}


def with_quant_format(cfg: DictConfig, fmt: str) -> DictConfig:
    """cfg with the `quant` group switched to conf/quant/<fmt>.yaml plus this run's quant.* overrides."""
    out = copy.deepcopy(cfg)
    with open_dict(out):
        out.quant = OmegaConf.merge(OmegaConf.load(quant_group_file(fmt)), quant_overrides(cfg))
        out.quant.formats = list(cfg.quant.formats)
        out.input = None
    return out


def plan(cfg: DictConfig) -> list[PlannedStage]:
    rd = RunDir.from_cfg(cfg)
    steps: list[PlannedStage] = []

    def add(stage, variant, stage_cfg, output, upstream):
        step = PlannedStage(stage, variant, stage_cfg, output, upstream)
        step.fingerprint = stage_fingerprint(stage_cfg, stage, upstream.fingerprint if upstream else "")
        steps.append(step)
        return step

    base_cfg = copy.deepcopy(cfg)
    with open_dict(base_cfg):
        base_cfg.input = None
    prev = add("base", None, base_cfg, rd.model_dir("base"), None)
    if int(cfg.trainer.get("pretrain_steps", 0) or 0) > 0:
        prev = add("pretrain", None, base_cfg, rd.model_dir("pretrain"), prev)
    sft = add("sft", None, base_cfg, rd.model_dir("sft"), prev)
    for fmt in cfg.quant.formats:
        qcfg = with_quant_format(cfg, str(fmt))
        name = output_name(qcfg)  # fp8, or fp8-text under calib=text
        quant = add("quantize", name, qcfg, rd.stage("quantize") / name, sft)
        ecfg = copy.deepcopy(qcfg)
        with open_dict(ecfg):
            ecfg.input = str(quant.output)
            ecfg.export.format = "hf"
            ecfg.export.name = name
            ecfg.export.overwrite = True  # the fingerprint decided to rebuild it
        add("export", name, ecfg, rd.stage("export") / name, quant)
    return steps


def state_file(rd: RunDir, step: PlannedStage) -> Path:
    return rd.root / ".dg_state" / f"{step.stage}{'-' + step.variant if step.variant else ''}.json"


def is_up_to_date(rd: RunDir, step: PlannedStage) -> bool:
    f = state_file(rd, step)
    if not step.output.exists() or not f.exists():
        return False
    return json.loads(f.read_text()).get("fingerprint") == step.fingerprint


def run(cfg: DictConfig) -> dict:
    from dg_pipeline.stages import run_stage_tracked

    rd = RunDir.from_cfg(cfg)
    steps = plan(cfg)
    rank_zero = is_rank_zero()
    say = print if rank_zero else (lambda *_args, **_kwargs: None)
    say(f"stage=all into {rd.root}: " + " -> ".join(s.label for s in steps))
    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    for step in steps:
        if not cfg.force and is_up_to_date(rd, step):
            say(f"[all] {step.label}: up to date (fingerprint {step.fingerprint}), skipped")
            timings[step.label] = 0.0
            continue
        step_cfg = copy.deepcopy(step.cfg)
        with open_dict(step_cfg):
            step_cfg.stage = step.stage
            # Rebuild a stale output; a missing one (an interrupted stage) is built, resuming its training.
            step_cfg.force = bool(cfg.force) or step.output.exists()
        say(f"\n[all] ===== {step.label} =====")
        t0 = time.perf_counter()
        run_stage_tracked(step_cfg, variant=step.variant)
        timings[step.label] = round(time.perf_counter() - t0, 1)
        if rank_zero:
            atomic_write_json(state_file(rd, step), {"fingerprint": step.fingerprint, "stage": step.label})
    summary = {"run_dir": str(rd.root), "seconds": round(time.perf_counter() - t_all, 1), "stages": timings}
    if rank_zero:
        atomic_write_json(rd.root / "all" / "summary.json", summary)
        _print_final_table(rd)
    say(f"\n[all] done in {summary['seconds']} s; outputs under {rd.root}")
    return summary


def _print_final_table(rd: RunDir) -> None:
    from dg_pipeline.verify import print_stage_table

    records = sorted(rd.root.glob("**/verify.json"))
    if records:
        print_stage_table(records)
