"""Grid files: expansion, paired levels, exclusions and one clear error per malformed kind."""

import tomllib
from pathlib import Path

import pytest

from infocnf.grid import GridError, load_grid, parse_grid

BASE = {"model": {"hidden_dims": [8], "num_blocks": 1}, "train": {"epochs": 1}}


def _grid(**extra):
    raw = {"grid": {"name": "g", "seeds": [0, 1]}, "base": BASE}
    raw.update(extra)
    return raw


def test_grid_expands_product_times_seeds():
    grid = parse_grid(
        _grid(
            factors={
                "conditioning": {"key": "conditioning.method", "levels": ["none", "ccnf", "infocnf"]},
                "tolerance": {"key": "solver.tolerance.strategy", "levels": ["fixed", "learned"]},
            }
        )
    )
    assert len(grid.cells) == 6
    assert grid.num_runs == 12
    cell = grid.cells[-1]
    assert cell.cell_id == "conditioning=infocnf,tolerance=learned"
    assert cell.configs[1].conditioning.method == "infocnf"
    assert cell.configs[1].solver.tolerance.strategy == "learned"
    assert cell.configs[1].seed == 1
    assert cell.configs[0].model.hidden_dims == (8,)


def test_grid_paired_levels_set_keys_together():
    levels = [
        {"name": "small", "train.batch_size": 32, "train.lr": 1e-3},
        {"name": "large", "train.batch_size": 256, "train.lr": 8e-3, "train.lr_decay_epochs": [3]},
    ]
    grid = parse_grid(_grid(factors={"batch": {"levels": levels}}))
    by_id = {c.cell_id: c.configs[0] for c in grid.cells}
    assert by_id["batch=small"].train.batch_size == 32
    assert by_id["batch=small"].train.lr == 1e-3
    assert by_id["batch=large"].train.batch_size == 256
    assert by_id["batch=large"].train.lr == 8e-3
    assert by_id["batch=large"].train.lr_decay_epochs == (3,)


def test_grid_exclude_drops_matching_cells():
    grid = parse_grid(
        _grid(
            factors={
                "conditioning": {"key": "conditioning.method", "levels": ["none", "infocnf"]},
                "tolerance": {"key": "solver.tolerance.strategy", "levels": ["fixed", "learned"]},
            },
            exclude=[{"conditioning": "none", "tolerance": "learned"}],
        )
    )
    ids = [c.cell_id for c in grid.cells]
    assert "conditioning=none,tolerance=learned" not in ids
    assert len(ids) == 3


def test_grid_config_hash_differs_per_seed_and_cell():
    grid = parse_grid(_grid(factors={"lr": {"key": "train.lr", "levels": [1e-3, 2e-3]}}))
    hashes = {c.config_hash(s) for c in grid.cells for s in grid.seeds}
    assert len(hashes) == 4


@pytest.mark.parametrize(
    "raw, match",
    [
        (_grid(factors={"lr": {"key": "train.lr", "levels": [0.0]}}), r"cell lr=0.0: invalid train.lr = 0.0"),
        (
            _grid(factors={"tol": {"key": "solver.tolerance.value", "levels": [-1e-5]}}),
            r"cell tol=-1e-05: invalid solver.tolerance.value",
        ),
        (_grid(factors={"data": {"key": "data.name", "levels": ["imagenet"]}}), r"invalid data.name = 'imagenet'"),
        (_grid(factors={"x": {"key": "train.nope", "levels": [1]}}), r"unknown setting 'train.nope'"),
        (_grid(factors={"x": {"levels": [1, 2]}}), r"factor 'x' has plain level 1 but no 'key'"),
        (_grid(factors={"x": {"key": "train.lr", "levels": []}}), r"factor 'x' needs a non-empty list of levels"),
        (_grid(factors={"x": [1, 2]}), r"factor 'x' must be a table with 'levels'"),
        (_grid(factors={"x": {"levels": [{"train.lr": 1e-3}]}}), r"level 0 is a table of settings and needs a 'name'"),
        (_grid(factors={"x": {"key": "train.lr", "levels": [1e-3, 1e-3]}}), r"duplicate levels"),
        (
            _grid(factors={"x": {"key": "train.lr", "levels": [1e-3]}}, exclude=[{"y": 1}]),
            r"exclude names unknown factor 'y'",
        ),
        (
            _grid(factors={"x": {"key": "train.lr", "levels": [1e-3]}}, exclude=[{"x": 5}]),
            r"exclude names unknown level 5 of factor 'x'",
        ),
        (
            _grid(factors={"x": {"key": "train.lr", "levels": [1e-3]}}, exclude=[{"x": 0.001}]),
            r"every combination is excluded",
        ),
        ({"grid": {"seeds": []}, "base": BASE}, r"seeds = \[\] must be a non-empty list"),
        ({"grid": {"seeds": [1, 1]}, "base": BASE}, r"seeds = \[1, 1\] must be a non-empty list of distinct"),
        ({"grid": {}, "base": BASE, "factor": {}}, r"unknown top-level tables \['factor'\]"),
        ({"grid": {}, "base": {"train": {"lr": -1.0}}}, r"\[base\]: invalid train.lr = -1.0"),
        (
            {
                "grid": {},
                "base": BASE,
                "factors": {"t": {"key": "solver.tolerance.strategy", "levels": ["manual"]}},
            },
            r"invalid solver.tolerance.per_block",
        ),
        (
            {
                "grid": {},
                "base": {**BASE, "solver": {"tolerance": {"per_block": [1e-4, 1e-4, 1e-4]}}},
                "factors": {"t": {"key": "solver.tolerance.strategy", "levels": ["manual"]}},
            },
            r"3 tolerances for a model with 1 CNF blocks",
        ),
    ],
)
def test_grid_malformed_raises_clear_error(raw, match):
    with pytest.raises(GridError, match=match):
        parse_grid(raw, "bad.toml")


def test_grid_lists_every_problem_at_once():
    raw = _grid(factors={"a": {"levels": [1]}, "b": {"key": "train.lr", "levels": []}})
    with pytest.raises(GridError) as info:
        parse_grid(raw, "bad.toml")
    text = str(info.value)
    assert "factor 'a'" in text
    assert "factor 'b'" in text


def test_load_grid_missing_file_and_bad_toml(tmp_path):
    with pytest.raises(GridError, match="grid file not found"):
        load_grid(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[grid\nname = 1")
    with pytest.raises(GridError, match="invalid TOML in grid file"):
        load_grid(bad)


@pytest.mark.parametrize("path", sorted(Path(__file__).parents[1].glob("ablations/*.toml")), ids=lambda p: p.name)
def test_shipped_grids_are_valid(path):
    grid = load_grid(path)
    assert grid.num_runs >= 1
    assert tomllib.loads(path.read_text())["grid"]["name"] == grid.name


def test_shipped_digits_grid_covers_required_cells():
    grid = load_grid(Path(__file__).parents[1] / "ablations" / "digits.toml")
    methods = {c.configs[grid.seeds[0]].conditioning.method for c in grid.cells}
    strategies = {c.configs[grid.seeds[0]].solver.tolerance.strategy for c in grid.cells}
    assert methods == {"none", "ccnf", "infocnf"}
    assert {"fixed", "learned"} <= strategies
    assert len(grid.seeds) >= 2


def test_table1_grid_matches_paper_settings():
    grid = load_grid(Path(__file__).parents[1] / "ablations" / "table1-cifar10.toml")
    configs = [c.configs[0] for c in grid.cells]
    small = [c for c in configs if c.train.batch_size == 900]
    large = [c for c in configs if c.train.batch_size == 8000]
    assert small and large
    assert all(c.train.lr == 1e-3 and c.train.lr_decay_epochs == (250,) for c in small)
    assert all(c.train.lr == 1e-2 and c.train.lr_decay_epochs == (120,) for c in large)
    assert all(c.train.epochs == 400 for c in configs)
    assert grid.seeds == (0, 1, 2)


def test_grid_lists_every_bad_base_section():
    raw = {"grid": {}, "base": {"data": {"name": "foo"}, "train": {"lrr": 1.0}, "solver": {"eval_tolerance": 0.0}}}
    with pytest.raises(GridError) as info:
        parse_grid(raw, "bad.toml")
    text = str(info.value)
    assert "bad.toml: [base]: invalid data.name = 'foo'" in text
    assert "unknown setting train.lrr" in text
    assert "solver.eval_tolerance" in text


def test_grid_bad_level_names_its_factor():
    factors = {"batch": {"levels": [{"name": "64", "train.batch_size": 64, "train.lr": True}]},
               "cond": {"key": "conditioning.method", "levels": ["none", "ccnf"]}}
    with pytest.raises(GridError) as info:
        parse_grid(_grid(factors=factors), "bad.toml")
    text = str(info.value)
    assert "invalid train.lr = True" in text
    assert "(set by factor 'batch', level '64')" in text
    # The same bad level in two cells is reported once.
    assert text.count("invalid train.lr") == 1
