"""Typed settings: one dataclass per config group, the schema Hydra composes conf/ into, and the objects stages
hand to components (never the whole Hydra config).

    conf/config.yaml   `defaults: [schema, ...]`: the composed config is typed by `RunSettings` (unknown keys and
                       wrong types fail at composition, naming the key)
    RunSettings.from_cfg(cfg)   the composed config as dataclasses; each group's rules (positive counts, choices)
                                run here and fail with an InputError naming the key
    compose(overrides)          the config `python -m dg_pipeline <overrides>` runs with
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, TypeVar

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from dg_pipeline.core.errors import InputError
from dg_pipeline.settings.checks import check_choice
from dg_pipeline.settings.data import DATA_KINDS, DataSettings
from dg_pipeline.settings.export import EXPORT_FORMATS, ExportSettings
from dg_pipeline.settings.model import DTYPES, ModelSettings
from dg_pipeline.settings.plan import PlanSettings
from dg_pipeline.settings.quant import CALIB_MODES, KV_CACHE_MODES, QUANT_FORMATS, CalibSettings, QuantSettings
from dg_pipeline.settings.sampler import SAMPLER_KEYS, SamplerSettings
from dg_pipeline.settings.training import LoggerSettings, ObjectiveSettings, ParallelSettings, TrainerSettings
from dg_pipeline.settings.verify import VerifySettings

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
SCHEMA = "schema"  # the name conf/config.yaml's defaults list takes the schema by
DEVICES = ("auto", "cpu", "cuda")
T = TypeVar("T")


@dataclass
class RunSettings:
    """The whole composed config: the groups, then the run's own keys (conf/config.yaml documents them)."""

    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    objective: ObjectiveSettings = field(default_factory=ObjectiveSettings)
    trainer: TrainerSettings = field(default_factory=TrainerSettings)
    logger: LoggerSettings = field(default_factory=LoggerSettings)
    sampler: SamplerSettings = field(default_factory=SamplerSettings)
    verify: VerifySettings = field(default_factory=VerifySettings)
    quant: QuantSettings = field(default_factory=QuantSettings)
    calib: CalibSettings = field(default_factory=CalibSettings)
    export: ExportSettings = field(default_factory=ExportSettings)
    plan: PlanSettings = field(default_factory=PlanSettings)
    stage: str = "all"
    run_dir: str = "runs/default"
    input: Optional[str] = None
    force: bool = False
    seed: int = 1234
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.device not in DEVICES and not self.device.startswith("cuda:"):
            raise InputError(f"device={self.device}: choose cpu, cuda or auto")
        if self.calib.mode == "text" and self.quant.self_conditioning:
            raise InputError(
                "quant.self_conditioning=true with calib.mode=text: the text loop never runs a self-conditioned "
                "decoder pass, so those quantizers would calibrate on zeros; use calib.mode=diffusion or "
                "quant.self_conditioning=false"
            )
        if self.sampler.canvas_init is None and self.objective.name == "masked":
            # sampler.canvas_init=null follows the objective: a masked model denoises a <mask> canvas, in the gate,
            # in calibration and everywhere else the run samples.
            self.sampler = dataclasses.replace(self.sampler, canvas_init="mask")

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> "RunSettings":
        """The composed config as typed settings, every group's rules checked."""
        return group_settings(cls, cfg)


def group_settings(cls: type[T], *nodes) -> T:
    """`cls` built from config nodes (a DictConfig, a loaded conf/<group>/*.yaml, a dict; later ones win), its
    rules checked. A required value left at `???` (e.g. model.base in recipe=chat) reads as None: the component
    that needs it says what to pass."""
    # Resolved in the nodes themselves: a copy would resolve ${now:...} (the default run_dir) again, a second later.
    values = [OmegaConf.to_container(n, resolve=True) if isinstance(n, DictConfig) else n for n in nodes]
    cfg = OmegaConf.merge(OmegaConf.structured(cls), *values)
    for key in OmegaConf.missing_keys(cfg):
        OmegaConf.update(cfg, key, None, force_add=True)
    return OmegaConf.to_object(cfg)


def register_schema() -> None:
    """Make RunSettings the schema conf/config.yaml composes onto (`defaults: [schema, ...]`)."""
    ConfigStore.instance().store(name=SCHEMA, node=RunSettings)


def compose(overrides: Sequence[str] = ()) -> DictConfig:
    """The config `python -m dg_pipeline <overrides>` runs with (inside a run: through the run's Hydra)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return hydra_compose(config_name="config", overrides=list(overrides))
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return hydra_compose(config_name="config", overrides=list(overrides))


register_schema()

__all__ = [
    "CALIB_MODES",
    "CONF_DIR",
    "DATA_KINDS",
    "DTYPES",
    "EXPORT_FORMATS",
    "KV_CACHE_MODES",
    "QUANT_FORMATS",
    "SAMPLER_KEYS",
    "CalibSettings",
    "DataSettings",
    "ExportSettings",
    "LoggerSettings",
    "ModelSettings",
    "ObjectiveSettings",
    "ParallelSettings",
    "PlanSettings",
    "QuantSettings",
    "RunSettings",
    "SamplerSettings",
    "TrainerSettings",
    "VerifySettings",
    "check_choice",
    "compose",
    "group_settings",
    "register_schema",
]
