"""Experiment recipes: the runs an experiment needs at one scale, as YAML data.

`recipes/<experiment>.<scale>.yaml`:

    experiment: locality            # the registry name
    base: {train.probe_every: 1}    # dotted config overrides on top of the scale's common base
    seeds: [0, 1, 2]                # optional: replaces the common seeds
    arms:                           # named groups of runs, each: base (more overrides), grid (cartesian
      alpha:                        # product) and variants (a list of override sets, one run group each)
        grid: {init.alpha: [1.0e-10, 0.5, 1.0]}
    params: {}                      # the experiment's own knobs (sample sizes, targets, ...)
    reference: []                   # the paper's numbers: [{match: {key: value}, teacher.linear: 35.5, ...}]
    tiny: {}                        # how the test-only scale `tiny` shrinks this recipe (deep-merged)

`recipes/common.<scale>.yaml` holds the preset, the run name, the base and seeds that every run of the
scale shares, and SLURM options. Runs of all experiments of a scale share one folder of content-addressed
run directories, so a run that two experiments need (e.g. the default recipe at alpha = 1e-10) is done once.

The hidden scale `tiny` (for tests) is the cpu recipe with `common.tiny.yaml`'s base on top, every grid
and variant list cut to its first two entries, and the recipe's own `tiny:` section merged last.
"""
from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ..config import Config, ConfigError, deep_merge, flatten, load_yaml, preset
from ..runs.sweep import SweepSpec, expand

SCALES = ("cpu", "paper")
TINY = "tiny"
PACKAGE = "randteach.experiments.recipes"
RECIPE_KEYS = ("experiment", "base", "seeds", "arms", "params", "reference", "tiny", "preset", "name", "slurm")
ARM_KEYS = ("base", "grid", "variants", "seeds")


@dataclass
class Arm:
    """One group of runs: base overrides x (variants) x (grid product) x seeds."""
    name: str
    base: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list] = field(default_factory=dict)
    variants: list[dict[str, Any]] = field(default_factory=lambda: [{}])
    seeds: list[int] | None = None  # None: the recipe's seeds

    def keys(self) -> list[str]:
        """The config keys this arm varies (what its table is grouped by)."""
        out = list(self.grid)
        for v in self.variants:
            out += [k for k in v if k not in out]
        return out


@dataclass
class Recipe:
    experiment: str
    scale: str
    preset: str | None
    name: str                      # run-name prefix shared by every run of the scale
    base: dict[str, Any]
    seeds: list[int]
    arms: list[Arm]
    params: dict[str, Any]
    reference: list[dict]
    slurm: dict[str, Any]
    source: str                    # where the recipe came from

    def arm(self, name: str) -> Arm:
        for a in self.arms:
            if a.name == name:
                return a
        raise ConfigError(f"recipe {self.source}: no arm {name!r}; arms: {', '.join(a.name for a in self.arms)}")

    def configs(self, arm: Arm, out: Path, overrides: dict | None = None,
                extra: dict | None = None) -> list[Config]:
        """The arm's runs as content-addressed configs in `out`: recipe base <- arm base <- variant <-
        `extra` <- `overrides` (the command line's), x grid x seeds."""
        configs, seen = [], set()
        for variant in arm.variants:
            # The preset enters as overrides parsed once (not re-read from YAML for every run).
            spec = SweepSpec(preset=None, name=self.name,
                             base={**preset_overrides(self.preset), **self.base, **arm.base, **variant,
                                   **(extra or {}), **(overrides or {})},
                             grid={k: v for k, v in arm.grid.items() if k not in (overrides or {})},
                             seeds=list(self.seeds if arm.seeds is None else arm.seeds), out=str(out))
            try:
                expanded = expand(spec)
            except ConfigError as e:
                raise ConfigError(f"recipe {self.source}, arm {arm.name}: {e}") from None
            for cfg in expanded:
                if cfg.out not in seen:
                    seen.add(cfg.out)
                    configs.append(cfg)
        return configs


@functools.lru_cache(maxsize=None)
def _preset_items(name: str | None) -> tuple:
    return tuple(flatten(preset(name)).items()) if name else ()


def preset_overrides(name: str | None) -> dict[str, Any]:
    """A preset as dotted overrides (applying them to the defaults is applying the preset)."""
    return copy.deepcopy(dict(_preset_items(name)))


def _resource(name: str) -> dict:
    path = resources.files(PACKAGE).joinpath(name)
    if not path.is_file():
        return {}
    return yaml.safe_load(path.read_text()) or {}


def recipe_names() -> list[str]:
    """Every `<experiment>.<scale>` recipe shipped with randteach."""
    return sorted(p.name[:-5] for p in resources.files(PACKAGE).iterdir()
                  if p.name.endswith(".yaml") and not p.name.startswith("common."))


def _first_two(doc: dict) -> dict:
    doc = copy.deepcopy(doc)
    for arm in (doc.get("arms") or {}).values():
        arm = arm or {}
        for key, values in (arm.get("grid") or {}).items():
            arm["grid"][key] = list(values)[:2]
        if arm.get("variants"):
            arm["variants"] = list(arm["variants"])[:2]
    return doc


def _read_doc(experiment: str, scale: str, path: str | Path | None) -> tuple[dict, str]:
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"recipe file {str(p)!r} does not exist")
        return load_yaml(p, "recipe"), str(p)
    if scale == TINY:
        doc = _resource(f"{experiment}.cpu.yaml")
        if not doc:
            raise ConfigError(f"no cpu recipe for experiment {experiment!r} to shrink to the tiny scale")
        tiny = doc.pop("tiny", None) or {}
        doc = deep_merge(_first_two(doc), {"base": (_resource("common.tiny.yaml").get("base") or {})})
        return deep_merge(doc, tiny), f"{experiment}.cpu.yaml (shrunk to tiny)"
    doc = _resource(f"{experiment}.{scale}.yaml")
    if not doc:
        raise ConfigError(f"no recipe for experiment {experiment!r} at scale {scale!r}; recipes: "
                          f"{', '.join(recipe_names())}")
    return doc, f"{experiment}.{scale}.yaml"


def load_recipe(experiment: str, scale: str, path: str | Path | None = None) -> Recipe:
    """The recipe of `experiment` at `scale` (cpu, paper, or the tests' tiny), or from a YAML file."""
    if scale not in SCALES + (TINY,):
        raise ConfigError(f"unknown scale {scale!r}; valid scales: {', '.join(SCALES)}")
    doc, source = _read_doc(experiment, scale, path)
    unknown = sorted(set(doc) - set(RECIPE_KEYS))
    if unknown:
        raise ConfigError(f"recipe {source}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(RECIPE_KEYS)}")
    if doc.get("experiment", experiment) != experiment:
        raise ConfigError(f"recipe {source} is for experiment {doc['experiment']!r}, not {experiment!r}")
    common = _resource(f"common.{scale}.yaml")
    seeds = doc.get("seeds", common.get("seeds", [0]))
    if not isinstance(seeds, list) or not all(isinstance(s, int) for s in seeds):
        raise ConfigError(f"recipe {source}: seeds must be a list of integers, got {seeds!r}")
    arms = []
    for name, a in (doc.get("arms") or {"main": {}}).items():
        a = a or {}
        bad = sorted(set(a) - set(ARM_KEYS))
        if bad:
            raise ConfigError(f"recipe {source}, arm {name}: unknown key(s) {', '.join(bad)}; valid: {', '.join(ARM_KEYS)}")
        grid = flatten(a.get("grid") or {})
        for k, v in grid.items():
            if not isinstance(v, list) or not v:
                raise ConfigError(f"recipe {source}, arm {name}: grid key {k} needs a non-empty list")
        arms.append(Arm(name, flatten(a.get("base") or {}), grid,
                        [flatten(v or {}) for v in a.get("variants") or [{}]], a.get("seeds")))
    return Recipe(experiment=experiment, scale=scale, preset=doc.get("preset", common.get("preset")),
                  name=str(doc.get("name", common.get("name", scale))),
                  base={**flatten(common.get("base") or {}), **flatten(doc.get("base") or {})},
                  seeds=list(seeds), arms=arms, params=dict(doc.get("params") or {}),
                  reference=list(doc.get("reference") or []),
                  slurm={**(common.get("slurm") or {}), **(doc.get("slurm") or {})}, source=source)
