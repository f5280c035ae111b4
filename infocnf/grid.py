"""Ablation grid files: parse, validate and expand factors x levels x seeds into run configs."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import RunConfig, apply_overrides, config_hash
from .flows import count_cnf_blocks
from .toml_config import read_toml_file

__all__ = ["Factor", "Level", "Cell", "Grid", "GridError", "load_grid", "parse_grid"]


class GridError(ValueError):
    """A grid file with one or more problems; the message lists each, naming file, factor and value."""


@dataclass(frozen=True)
class Level:
    """One level of a factor: a name and the config settings (dotted keys) it applies."""

    name: str
    settings: dict[str, Any]


@dataclass(frozen=True)
class Factor:
    """A grid factor: its name and its levels."""

    name: str
    levels: tuple[Level, ...]


@dataclass(frozen=True)
class Cell:
    """One combination of factor levels (without the seed), its resolved config per seed and its id."""

    cell_id: str
    levels: dict[str, str]
    settings: dict[str, Any]
    configs: dict[int, RunConfig]

    def config_hash(self, seed: int) -> str:
        return config_hash(self.configs[seed])


@dataclass(frozen=True)
class Grid:
    """An expanded, validated grid: every cell and seed has a valid RunConfig."""

    name: str
    path: str
    experiment: str
    kind: str
    factors: tuple[Factor, ...]
    seeds: tuple[int, ...]
    cells: tuple[Cell, ...]
    base: dict[str, Any]

    @property
    def num_runs(self) -> int:
        return len(self.cells) * len(self.seeds)


def _level_name(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _parse_factor(name: str, raw: Any, where: str, errors: list[str]) -> Factor | None:
    if not isinstance(raw, dict) or "levels" not in raw:
        errors.append(
            f"{where}: factor {name!r} must be a table with 'levels' (and 'key' for plain values), got {raw!r}"
        )
        return None
    unknown = set(raw) - {"key", "levels"}
    if unknown:
        errors.append(f"{where}: factor {name!r} has unknown entries {sorted(unknown)}; allowed: key, levels")
    levels_raw = raw["levels"]
    if not isinstance(levels_raw, list) or not levels_raw:
        errors.append(f"{where}: factor {name!r} needs a non-empty list of levels, got {levels_raw!r}")
        return None
    levels = []
    key = raw.get("key")
    for i, item in enumerate(levels_raw):
        if isinstance(item, dict):
            # Paired level: several settings that go together, such as a batch size and its learning rate.
            settings = {k: v for k, v in item.items() if k != "name"}
            if "name" not in item or not isinstance(item["name"], str):
                errors.append(f"{where}: factor {name!r} level {i} is a table of settings and needs a 'name' string")
                continue
            if not settings:
                errors.append(f"{where}: factor {name!r} level {item['name']!r} sets nothing")
                continue
            if key is not None:
                errors.append(f"{where}: factor {name!r} mixes 'key' with table levels; drop 'key' or use plain values")
            levels.append(Level(item["name"], settings))
        else:
            if not isinstance(key, str):
                errors.append(
                    f"{where}: factor {name!r} has plain level {item!r} but no 'key' naming the setting it sets "
                    f"(for example key = \"train.lr\")"
                )
                continue
            levels.append(Level(_level_name(item), {key: item}))
    names = [level.name for level in levels]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        errors.append(f"{where}: factor {name!r} has duplicate levels {duplicates}")
    return Factor(name, tuple(levels)) if levels else None


def _excluded(levels: dict[str, str], rules: list[dict[str, Any]]) -> bool:
    return any(all(levels[f] == _level_name(v) for f, v in rule.items()) for rule in rules)


def parse_grid(raw: dict[str, Any], path: str = "<grid>") -> Grid:
    """Validate and expand a parsed grid file; raises GridError listing every problem."""
    errors: list[str] = []
    unknown = set(raw) - {"grid", "base", "factors", "exclude"}
    if unknown:
        errors.append(f"{path}: unknown top-level tables {sorted(unknown)}; allowed: grid, base, factors, exclude")
    meta = raw.get("grid", {})
    if not isinstance(meta, dict):
        meta = {}
        errors.append(f"{path}: [grid] must be a table")
    meta_unknown = set(meta) - {"name", "experiment", "seeds", "kind"}
    if meta_unknown:
        errors.append(f"{path}: [grid] has unknown keys {sorted(meta_unknown)}; allowed: name, experiment, seeds, kind")
    name = meta.get("name", Path(path).stem)
    experiment = meta.get("experiment", f"infocnf-{name}")
    kind = meta.get("kind", "cnf")
    if kind not in ("cnf", "latent_ode"):
        errors.append(f"{path}: [grid] kind = {kind!r} is unknown; use cnf or latent_ode")
    seeds = meta.get("seeds", [0])
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)
        or len(set(seeds)) != len(seeds)
    ):
        errors.append(f"{path}: [grid] seeds = {seeds!r} must be a non-empty list of distinct integers >= 0")
        seeds = [0]
    base = raw.get("base", {})
    if not isinstance(base, dict):
        errors.append(f"{path}: [base] must be a table of run settings")
        base = {}

    factors_raw = raw.get("factors", {})
    factors: list[Factor] = []
    if not isinstance(factors_raw, dict):
        errors.append(f"{path}: [factors] must be a table of factors")
    else:
        for factor_name, factor_raw in factors_raw.items():
            factor = _parse_factor(factor_name, factor_raw, path, errors)
            if factor is not None:
                factors.append(factor)

    rules = raw.get("exclude", [])
    if not isinstance(rules, list) or not all(isinstance(r, dict) and r for r in rules):
        errors.append(f"{path}: exclude must be an array of tables ([[exclude]]) mapping factor names to levels")
        rules = []
    by_name = {f.name: f for f in factors}
    for rule in rules:
        for factor_name, value in rule.items():
            if factor_name not in by_name:
                errors.append(f"{path}: exclude names unknown factor {factor_name!r}; factors: {sorted(by_name)}")
            elif _level_name(value) not in {lvl.name for lvl in by_name[factor_name].levels}:
                errors.append(
                    f"{path}: exclude names unknown level {value!r} of factor {factor_name!r}; levels: "
                    f"{[lvl.name for lvl in by_name[factor_name].levels]}"
                )
    if errors:
        raise GridError("invalid grid file:\n  " + "\n  ".join(errors))

    cells = _expand(path, kind, base, factors, rules, seeds, errors)
    if errors:
        # A bad setting shared by many cells is reported once, for its first cell.
        unique, seen = [], set()
        for error in errors:
            key = error.split(": ", 2)[-1]
            if key not in seen:
                seen.add(key)
                unique.append(error)
        raise GridError("invalid grid file:\n  " + "\n  ".join(unique))
    if not cells:
        raise GridError(f"invalid grid file:\n  {path}: every combination is excluded; nothing to run")
    return Grid(name, path, experiment, kind, tuple(factors), tuple(seeds), tuple(cells), base)


def _expand(path, kind, base, factors, rules, seeds, errors) -> list[Cell]:
    cells = []
    if kind == "latent_ode":
        from .latent_ode.config import LatentODEConfig, apply_latent_ode_overrides

        config_type, override = LatentODEConfig, apply_latent_ode_overrides
    else:
        config_type, override = RunConfig, apply_overrides
    try:
        base_config = config_type.from_dict(base)
    except ValueError as exc:
        errors.extend(f"{path}: [base]: {problem}" for problem in _base_problems(config_type, base, exc))
        return []
    for combo in itertools.product(*(f.levels for f in factors)):
        levels = {f.name: lvl.name for f, lvl in zip(factors, combo)}
        if _excluded(levels, rules):
            continue
        settings: dict[str, Any] = {}
        for factor, level in zip(factors, combo):
            settings.update(level.settings)
        cell_id = ",".join(f"{k}={v}" for k, v in levels.items()) or "base"
        configs = {}
        try:
            config = override(base_config, settings)
            for seed in seeds:
                configs[seed] = override(config, {"seed": seed})
            if kind == "cnf":
                _check_manual_blocks(config)
        except ValueError as exc:
            errors.append(f"{path}: cell {cell_id}: {exc}{_culprit(override, base_config, factors, combo)}")
            continue
        cells.append(Cell(cell_id, levels, settings, configs))
    return cells


def _base_problems(config_type, base: dict[str, Any], error: ValueError) -> list[str]:
    """List one problem per [base] section, since building the whole config stops at the first.

    Each section is built alone over the defaults. When no section fails alone, only their
    combination is invalid, and ``error`` is the one problem.
    """
    problems = []
    for section, value in base.items():
        try:
            config_type.from_dict({section: value})
        except ValueError as exc:
            problems.append(str(exc))
    return problems or [str(error)]


def _culprit(override, base_config, factors, combo) -> str:
    """Name the factor level whose settings are invalid on their own, or "" if only their combination is."""
    for factor, level in zip(factors, combo):
        try:
            override(base_config, level.settings)
        except ValueError:
            return f" (set by factor {factor.name!r}, level {level.name!r})"
    return ""


def _check_manual_blocks(config: RunConfig) -> None:
    tolerance = config.solver.tolerance
    if tolerance.strategy != "manual":
        return
    blocks = count_cnf_blocks(config.model)
    if len(tolerance.per_block) != blocks:
        raise ValueError(
            f"invalid solver.tolerance.per_block: {len(tolerance.per_block)} tolerances for a model with "
            f"{blocks} CNF blocks; give exactly one per block, in flow order"
        )


def load_grid(path: str | Path) -> Grid:
    """Read, validate and expand a TOML grid file."""
    path = Path(path)
    raw = read_toml_file(
        path,
        f"grid file not found: {path}; pass a TOML grid such as ablations/digits.toml",
        f"invalid TOML in grid file {path}",
        error=GridError,
    )
    return parse_grid(raw, str(path))
