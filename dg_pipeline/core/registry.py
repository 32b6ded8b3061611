"""The stage registry: the one table of the pipeline's stages. Everything that needs the stage graph derives from it:
the run-dir layout (which stage's output is whose input), the fingerprints (which config groups rerun a stage),
the order of gate tables, stage=all's plan and the CLI's dispatch (dg_pipeline.stages, one module per row).

Reuse (when a stage skips its work) is decided by `decide_reuse` alone, from the row's `reuse` rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# Reuse rules: what a stage needs to find before it reuses its output instead of running (force=true always runs).
# Every stage with an output reuses it by the one rule, REUSE: its output exists, its gate record beside it passed,
# and both were made with the same settings and input (the fingerprint the gate record holds). The exceptions
# (NEVER) say why in their row.
NEVER = "never"  # always runs (a read-only check, a measurement, or an output that is refused when it exists)
REUSE = "its output passed its gate and was made with the same settings and input"


@dataclass(frozen=True)
class StageSpec:
    name: str  # stage=<name>; its module is dg_pipeline/stages/<name>.py
    provider: str | None  # the stage whose output is this stage's default input (input= overrides it)
    output: str | None  # where it writes, under <run_dir> ({variant}: one dir per quant format)
    fingerprint_keys: tuple[str, ...]  # the config groups it reads: a change in one (or in its input) reruns it
    reuse: str  # the evidence a skip needs (see above)
    gate_record: str | None = None  # its gate's verify.json under <run_dir> (the record a reuse reads)
    why_never: str = ""  # for reuse=NEVER with an output: why the one rule does not apply
    summary: str = ""
    in_all: bool = True  # stage=all runs it (in table order; a {variant} stage once per quant.formats entry)
    # An optional stage: stage=all runs it only when this count is > 0; its consumers fall back to its provider.
    enabled_by: str | None = None
    all_overrides: tuple[str, ...] = ()  # what stage=all adds to this step's command line ({variant} filled in)
    every_rank: bool = False  # it trains: every rank of a multi-process run runs it (other stages: rank 0 alone)
    tracked: bool = True  # W&B logs its verify.json metrics and its output as a lineage artifact

    @property
    def optional(self) -> bool:
        return self.enabled_by is not None

    @property
    def per_variant(self) -> bool:
        return self.output is not None and "{variant}" in self.output

    def gate_record_path(self, run_dir: Path, variant: str | None = None) -> Path | None:
        return None if self.gate_record is None else Path(run_dir) / self.gate_record.format(variant=variant)

    def output_dir(self, run_dir: Path, variant: str | None = None) -> Path | None:
        if self.output is None:
            return None
        if "{variant}" in self.output and not variant:
            raise ValueError(f"stage {self.name} writes one dir per variant; pass the variant")
        return Path(run_dir) / self.output.format(variant=variant)


STAGES: dict[str, StageSpec] = {s.name: s for s in (
    StageSpec("base", None, "base/model", ("model", "seed"), REUSE, "base/verify.json",
              summary="base weights: model.base (loaded or converted) or model.init (random)"),
    StageSpec("pretrain", "base", "pretrain/model", ("model", "data", "trainer", "seed"), REUSE,
              "pretrain/verify.json",
              summary="causal-LM training of the shared weights", enabled_by="trainer.pretrain_steps",
              every_rank=True),
    StageSpec("sft", "pretrain", "sft/model",
              ("model", "data", "objective", "trainer", "sampler", "verify", "seed"), REUSE, "sft/verify.json",
              summary="block-diffusion fine-tuning, then the gate", every_rank=True),
    StageSpec("eval", "sft", "eval", (), NEVER, "eval/verify.json", in_all=False,
              why_never="a measurement of whatever input= holds now: always measured again",
              summary="the gate on any dir the pipeline writes (model dir, quantize output, export)"),
    StageSpec("quantize", "sft", "quantize/{variant}", ("quant", "calib", "sampler", "verify", "seed"), REUSE,
              "quantize/{variant}/verify.json", summary="ModelOpt calibration per format, then the gate"),
    StageSpec("export", "quantize", "export/{variant}", ("export", "quant", "sampler", "verify"), NEVER,
              "export/{variant}/verify.json",
              why_never="a release is never reused silently: an existing bundle is refused unless export.overwrite="
                        "true, which swaps the new one in only after its gate passed (stage=all reuses it by the one "
                        "rule, with its fingerprint)",
              summary="the release bundle: loader rules, reload gate, model card, manifest",
              # the fingerprint decided to rebuild it, so it may replace the old bundle
              all_overrides=("export.format=hf", "export.name={variant}", "export.overwrite=true")),
    StageSpec("check", "export", None, (), NEVER, summary="the loader rules on exported dirs", in_all=False),
    StageSpec("plan", None, "plan", ("model", "data", "objective", "trainer", "plan"), NEVER,
              why_never="a few seconds on the meta device, no gate: always computed again",
              summary="per-device memory of sft under the sharding plan (meta device, no training)", in_all=False,
              tracked=False),
)}

# Pipeline order (gate tables list stages in it).
STAGE_ORDER = tuple(STAGES)


def provider_of(stage: str, exists) -> str | None:
    """The stage whose output `stage` starts from: its provider, or, past an optional provider that did not run
    (`exists(name)` is false), that provider's own."""
    provider = STAGES[stage].provider
    while provider is not None and STAGES[provider].optional and not exists(provider):
        provider = STAGES[provider].provider
    return provider


@dataclass(frozen=True)
class Reuse:
    """Whether a stage reuses its output, and why (printed either way)."""

    skip: bool
    reason: str


def decide_reuse(rule: str, output: Path, *, force: bool = False, gate_record: dict | None = None,
                 fingerprint: str | dict | None = None, recorded_fingerprint: str | dict | None = None) -> Reuse:
    """The one skip decision: with rule REUSE, reuse `output` only when it exists, its gate record (its verify.json,
    read) passed, and the fingerprint it was made with (`recorded_fingerprint`) is this run's (`fingerprint`).
    Fingerprints as {part: hash} maps (core.fingerprint.fingerprint_parts) let the reason name what changed."""
    if rule == NEVER:
        return Reuse(False, "always runs")
    if force:
        return Reuse(False, "force=true")
    if not Path(output).exists():
        return Reuse(False, f"{output} does not exist")
    if gate_record is None:
        return Reuse(False, f"{output} has no gate record (its gate never finished)")
    if not gate_record.get("passed"):
        return Reuse(False, f"{output} recorded a failed gate")
    if recorded_fingerprint != fingerprint:
        return Reuse(False, f"{output} was made {_what_changed(fingerprint, recorded_fingerprint)}")
    return Reuse(True, f"{output} exists, passed its gate, with these settings on this input")


def reuse_beside_gate(stage: str, output: Path, gate_record: dict | None, fingerprint: str | dict,
                      force: bool = False) -> Reuse:
    """decide_reuse for stage `stage` whose gate record (verify.json beside `output`) also holds the fingerprint the
    output was made with (base, pretrain, sft)."""
    return decide_reuse(STAGES[stage].reuse, output, force=force, gate_record=gate_record, fingerprint=fingerprint,
                        recorded_fingerprint=(gate_record or {}).get("fingerprint"))


def _what_changed(now, recorded) -> str:
    if recorded is None:
        return "without a recorded fingerprint"
    if isinstance(now, dict) and isinstance(recorded, dict):
        changed = sorted(k for k in {*now, *recorded} if now.get(k) != recorded.get(k))
        groups = [k for k in changed if k != "input"]
        parts = ([f"other {', '.join(groups)} settings"] if groups else []) + (
            ["another input"] if "input" in changed else [])
        return "with " + " and ".join(parts)
    return "with other settings or another input"


def registry_markdown() -> str:
    """The registry as the table docs/ARCHITECTURE.md opens with (a test keeps the two equal)."""
    lines = ["| stage | module | starts from | writes (under run_dir) | reruns when these change | reuses its output "
             "when | does |", "|---|---|---|---|---|---|---|"]
    for s in STAGES.values():
        provider = f"`{s.provider}`" if s.provider else "-"
        if s.provider and STAGES[s.provider].optional:
            provider += f", else `{STAGES[s.provider].provider}`"
        keys = ", ".join(f"`{k}`" for k in s.fingerprint_keys) or "-"
        name = f"`{s.name}`" + (f" (when `{s.enabled_by}` > 0)" if s.optional else "") + ("" if s.in_all else " *") \
            + (" (every rank)" if s.every_rank else "")
        reuse = s.reuse + (f" ({s.why_never})" if s.why_never else "")
        lines.append(f"| {name} | `stages/{s.name}.py` | {provider} | {f'`{s.output}`' if s.output else '-'} | {keys} "
                     f"| {reuse} | {s.summary} |")
    return "\n".join(lines) + ("\n\n`*`: not part of `stage=all`. (every rank): every rank of a multi-process run "
                               "runs it; the other stages run on rank 0 while the other ranks wait.\n")
