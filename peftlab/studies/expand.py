"""From a study to its runs: grid points x arms x seeds, each a validated run config.

Order: grid points outermost (product axes in file order, the zipped axis after them),
then arms, then seeds — seed 000's order (budget, then allocation, then seed).
Overrides apply in this order, later ones winning: the base config, ``overrides``, the
scale's overrides, the grid point, the arm (and the scale's overrides of that arm), the
command line's ``--section.key=value``, budget matching (only keys the study did not set
itself), ``training.seed``, and ``output.dir = <study dir>/<run name>``.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from ..config import load_config
from ..errors import ConfigError
from .budget import budget_overrides, reference_params, reference_rank
from .spec import StudySpec, name_problem

_FIELD = re.compile(r"\{([^{}]+)\}")
_BAD_NAME = re.compile(r"[^A-Za-z0-9._+=-]")


@dataclass
class Trial:
    """One run of a study."""

    index: int  # 1-based position in the study
    name: str
    arm: Optional[str]
    seed: int
    overrides: dict[str, Any]  # everything the study sets (grid, arm, seed, budget), without output.dir
    cfg: Any  # the validated RunConfig, output.dir = run_dir
    run_dir: Path
    budget_note: str = ""
    budget_overrides: dict[str, Any] = field(default_factory=dict)

    def provenance(self, spec: StudySpec) -> dict[str, Any]:
        return {"study": spec.study.name, "study_file": str(spec.path) if spec.path else None, "scale": spec.scale,
                "study_dir": str(spec.output_dir), "trial": self.name, "index": self.index, "arm": self.arm, "seed": self.seed}


def grid_points(spec: StudySpec) -> list[dict[str, Any]]:
    """Every grid point as a dict of dotted keys (one empty point when there is no grid)."""
    prod_keys = list(spec.grid.product)
    prod = [dict(zip(prod_keys, combo)) for combo in itertools.product(*(spec.grid.product[k] for k in prod_keys))]
    zkeys = list(spec.grid.zip)
    zrows = [dict(zip(zkeys, row)) for row in zip(*(spec.grid.zip[k] for k in zkeys))] if zkeys else [{}]
    return [{**p, **z} for p in prod for z in zrows]


def _lookup(key: str, values: dict[str, Any], cfg_dict: dict[str, Any]) -> Any:
    if key in values:
        return values[key]
    node: Any = cfg_dict
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(key)
        node = node[part]
    return node


def render_name(template: str, values: dict[str, Any], cfg_dict: dict[str, Any]) -> str:
    """Fill ``{dotted.key}`` / ``{key:format}`` fields from the trial's values, then its config."""
    def sub(m: re.Match) -> str:
        body = m.group(1)
        key, _, fmt = body.partition(":")
        v = _lookup(key.strip(), values, cfg_dict)
        return format(v, fmt) if fmt else str(v)

    return _FIELD.sub(sub, template)


def _outside(study_dir: Path, name: str) -> Optional[str]:
    """Why run directory ``name`` would not lie inside ``study_dir`` once resolved (a symlink out), or None."""
    root = study_dir.resolve()
    where = (root / name).resolve()
    if where == root or root not in where.parents:
        return f"run directory {study_dir / name} resolves to {where}, outside the study directory {root}."
    return None


def expand(spec: StudySpec, output_dir: Optional[Path] = None, budget_cache: Optional[dict] = None,
           lora_params_fn: Optional[Callable[[Any, int], int]] = None) -> list[Trial]:
    """The study's trials, each with a validated run config; every problem is raised at once.

    ``lora_params_fn(cfg, r)`` counts the reference budget at rank ``r`` (default: the method
    ``budget.match`` names, :func:`.budget.reference_params`); ``budget_cache`` keeps the counts
    by (model, dataset, targets, r) across calls.

    Raises:
        ConfigError: a run config is invalid, a name template names an unknown key, or two
            runs get the same name.
    """
    study_dir = Path(output_dir).expanduser() if output_dir is not None else spec.output_dir
    reference = spec.budget.match
    count = lora_params_fn or (lambda c, r: reference_params(c, r, reference))
    budget_cache = {} if budget_cache is None else budget_cache
    arms = spec.arms or [None]
    problems: list[str] = []
    trials: list[Trial] = []
    try:
        base_cfg = load_config(spec.base, spec.overrides)
    except ConfigError as e:
        raise ConfigError([f"base config with the study's overrides: {p}" for p in e.problems]) from None
    seeds = spec.seeds or [base_cfg.training.seed]
    seed_setters = [where for where, ov in [("overrides", spec.overrides), ("the command line", spec.cli_overrides),
                                            *[(f"arm {a.name}", a.overrides) for a in spec.arms]] if "training.seed" in ov]
    if spec.seeds and seed_setters:
        raise ConfigError([f"training.seed is set in {', '.join(seed_setters)} but the study lists seeds {list(spec.seeds)}, "
                           "which decide every run's seed; change `seeds:` instead (e.g. --seeds in the study file)."])
    index = 0
    for point in grid_points(spec):
        for arm in arms:
            for seed in seeds:
                index += 1
                ov: dict[str, Any] = {**spec.overrides, **point, **(arm.overrides if arm else {}), **spec.cli_overrides,
                                      "training.seed": seed}
                label = f"run {index} (arm {arm.name if arm else '-'}, seed {seed}{', ' + ', '.join(f'{k}={v}' for k, v in point.items()) if point else ''})"
                try:
                    cfg = load_config(spec.base, ov)
                except ConfigError as e:
                    problems.extend(f"{label}: {p}" for p in e.problems)
                    continue
                b_ov, note = {}, ""
                if reference != "none":
                    r = spec.budget.r or reference_rank(cfg, reference)
                    if not r:
                        problems.append(f"{label}: budget.match {reference!r} has no rank of its own in this run's config; set budget.r.")
                        continue
                    key = (cfg.model.name, cfg.data.dataset, tuple(cfg.model.target_modules or ()), r)
                    if key not in budget_cache:
                        budget_cache[key] = count(cfg, r)
                    b_ov, note = budget_overrides(cfg, budget_cache[key], r)
                    b_ov = {k: v for k, v in b_ov.items() if k not in ov}  # what the study sets itself wins
                    if b_ov:
                        try:
                            cfg = load_config(spec.base, {**ov, **b_ov})
                        except ConfigError as e:
                            problems.extend(f"{label}, after budget matching {b_ov}: {p}" for p in e.problems)
                            continue
                values = {"seed": seed, "arm": arm.name if arm else "", "index": index, "study": spec.study.name,
                          "method": cfg.method, **point, **(arm.overrides if arm else {}), **b_ov}
                try:
                    name = render_name(spec.study.run_name, values, cfg.to_dict())
                except KeyError as e:
                    raise ConfigError([f"`study.run_name` {spec.study.run_name!r} names {e.args[0]!r}, which is neither a config key "
                                       "nor one of seed, arm, index, study, method; use a dotted key such as {training.learning_rate}."]) from None
                except (ValueError, TypeError) as e:
                    raise ConfigError([f"`study.run_name` {spec.study.run_name!r} cannot be filled for {label}: {e}."]) from None
                if not name or _BAD_NAME.search(name):
                    problems.append(f"run name {name!r} of {label} has characters that do not belong in a directory name "
                                    "(allowed: letters, digits, . _ + = -); change `study.run_name`.")
                    continue
                bad = name_problem(f"run name of {label}", name) or _outside(study_dir, name)
                if bad is not None:
                    problems.append(f"{bad} The name comes from `study.run_name` {spec.study.run_name!r}; change it.")
                    continue
                run_dir = study_dir / name
                cfg = cfg.replace({"output.dir": str(run_dir)})
                trials.append(Trial(index, name, arm.name if arm else None, seed, {**ov, **b_ov}, cfg, run_dir, note, b_ov))
    names = [t.name for t in trials]
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:
        problems.append(f"{len(dups)} run name(s) occur more than once ({', '.join(dups[:5])}); `study.run_name` "
                        f"{spec.study.run_name!r} must tell every run apart; add the varying keys, e.g. {{arm}} or {{seed}}.")
    if problems:
        raise ConfigError([f"{spec.path.name if spec.path else 'study'}: {p}" for p in problems])
    return trials
