"""The study file: a YAML description of many runs, validated like run configs.

    study:
      name: learning_rates
      output_dir: runs/studies/learning_rates
      run_name: "lr{training.learning_rate}_{arm}_seed{seed}"
    base: base/my_run.yaml                      # a run config, relative to this file (null: defaults)
    overrides: {training.epochs: 1}             # dotted keys, applied to every run
    grid:
      product: {training.learning_rate: [1e-4, 3e-4]}          # every combination
      zip: {training.batch_size: [8, 16], training.warmup_ratio: [0.0, 0.1]}   # walked together (equal lengths)
    arms:                                       # named variants with their own overrides
      - {name: a, overrides: {method: <a method>}}
    seeds: [42, 123, 999]                       # training.seed of each run
    budget: {match: <a method>, r: 8}           # every run gets that method's parameter count at rank r
    follow_up:
      per_run: ["bounds {run_dir} --bounds.bound_type=document_level"]
      study: ["analyze {study_dir} --output-dir {study_dir}/analysis"]
    execution: {processes_per_run: 1, launcher: accelerate}
    scales:                                     # --preset-scale=cpu: a small variant
      cpu: {overrides: {model.name: tiny-gpt2}, seeds: [42]}

The shipped studies are in configs/studies/ (docs/studies.md).

Every section is a typed dataclass built by the same machinery as run configs, so an
unknown key gets "Did you mean ...?" and every problem is reported at once
(:class:`~peftlab.errors.ConfigError`). The run configs themselves are validated when the
study is expanded (:func:`peftlab.studies.expand.expand`).
"""

from __future__ import annotations

import copy
import dataclasses
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from ..errors import ConfigError, PeftlabError
from ..io import read_text
from ..methods import METHODS
from ..options import build_section, opt, suggest


@dataclass
class StudySection:
    name: str = opt("", "Name of the study (recorded in each run's provenance).")
    description: str = opt("", "One line on what the study asks.")
    output_dir: Optional[str] = opt(None, "Study directory: one run directory per run, study.log, study.jsonl (default runs/studies/<name>).")
    run_name: str = opt("{arm}_seed{seed}", "Run-name template: {seed}, {arm}, {index}, {study}, {method} or any dotted config key, e.g. lr{training.learning_rate}_seed{seed}.")


@dataclass
class GridSection:
    product: dict = opt({}, "Dotted key -> list of values; every combination becomes a grid point.")
    zip: dict = opt({}, "Dotted key -> list of values, all lists of one length, walked together (one axis).")


@dataclass
class ArmSection:
    name: str = opt("", "Name of the arm ({arm} in run names).")
    overrides: dict = opt({}, "Dotted-key overrides of this arm, e.g. {method: <name>, training.learning_rate: 1e-4}.")
    description: str = opt("", "One line on what the arm is.")


@dataclass
class BudgetSection:
    match: str = opt("none", "none, or the method whose parameter budget at rank r on the same targets every run gets (Method.budget_params); each method says how it meets it (Method.budget_overrides).")
    r: Optional[int] = opt(None, "The reference rank (default: the reference method's own rank in each run's config, Method.budget_rank).")


@dataclass
class FollowUpSection:
    before: list[str] = opt([], "peftlab commands run once before any run (e.g. `data prepare ... --output-dir {study_dir}/bins`); a finished one is not repeated.")
    per_run: list[str] = opt([], "peftlab commands run after each completed run, e.g. `bounds {run_dir}`; {run_dir}, {name}, {config} (the run's resolved YAML), {study_dir} are filled in.")
    study: list[str] = opt([], "peftlab commands run once after all runs, e.g. `analyze {study_dir} --output-dir {study_dir}/analysis`.")


@dataclass
class ExecutionSection:
    processes_per_run: int = opt(1, "Processes (GPUs) per run; above 1 each run is started by the launcher below.")
    launcher: Literal["accelerate", "torchrun"] = opt("accelerate", "Multi-process launcher when processes_per_run > 1.")
    cpu_runs: int = opt(1, "Runs at once on this machine when the sweep has no --gpus; each gets system.num_threads = CPU cores // cpu_runs unless it sets its own (small runs on a laptop finish sooner side by side than one after the other on every core). `peftlab sweep --cpu-runs N` overrides it.")
    max_attempts_same_error: int = opt(2, "A run that failed this many times in a row with the same error is not retried (use --retry-failed).")
    slurm: dict = opt({}, "submitit/Slurm parameters for --engine=slurm, e.g. {slurm_partition: gpu, timeout_min: 720, gpus_per_node: 1}.")


@dataclass
class ScaleSection:
    base: Optional[str] = opt(None, "Another base run config for this scale (relative to the study file).")
    overrides: dict = opt({}, "Dotted-key overrides for every run at this scale (applied after the study's own).")
    seeds: Optional[list[int]] = opt(None, "Seeds at this scale (replaces the study's).")
    grid: dict = opt({}, "Dotted key -> list of values replacing that grid axis' values at this scale.")
    arms: Optional[list[str]] = opt(None, "Keep only these arms at this scale.")
    arm_overrides: dict = opt({}, "Arm name -> dotted-key overrides applied after that arm's own at this scale.")
    output_dir: Optional[str] = opt(None, "Study directory at this scale (default: the study's with -<scale> appended).")
    follow_up: Optional[dict] = opt(None, "Replaces the study's follow_up at this scale ({per_run: [...], study: [...]}).")
    description: str = opt("", "What this scale is for.")


TOP_LEVEL = ("study", "base", "overrides", "grid", "arms", "seeds", "budget", "follow_up", "execution", "scales")


@dataclass
class StudySpec:
    """A validated study file (before expansion into runs)."""

    study: StudySection
    base: Optional[Path]
    overrides: dict[str, Any]
    grid: GridSection
    arms: list[ArmSection]
    seeds: Optional[list[int]]
    budget: BudgetSection
    follow_up: FollowUpSection
    execution: ExecutionSection
    scales: dict[str, ScaleSection]
    path: Optional[Path] = None
    scale: Optional[str] = None
    commands: Optional[set[str]] = None  # the valid follow-up commands; None: follow-ups are not checked
    cli_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)  # --section.key=value of `peftlab sweep`: win over the file

    @property
    def output_dir(self) -> Path:
        return Path(self.study.output_dir or f"runs/studies/{self.study.name}").expanduser()

    def at_scale(self, scale: Optional[str]) -> "StudySpec":
        """This study with scale ``scale``'s changes applied (None: unchanged)."""
        if scale is None:
            return self
        if scale not in self.scales:
            known = ", ".join(sorted(self.scales)) or "none"
            raise ConfigError([f"study {self.study.name!r} has no scale {scale!r}.{suggest(scale, self.scales)} Scales it defines: {known}."])
        sc = self.scales[scale]
        out = copy.deepcopy(self)
        out.scale = scale
        if sc.base is not None:
            out.base = _resolve_path(sc.base, self.path)
        out.overrides = {**self.overrides, **sc.overrides}
        if sc.seeds is not None:
            out.seeds = list(sc.seeds)
        problems = []
        for key, values in sc.grid.items():
            if key in out.grid.product:
                out.grid.product[key] = list(values)
            elif key in out.grid.zip:
                out.grid.zip[key] = list(values)
            else:
                problems.append(f"scale {scale!r} replaces grid axis `{key}`, which the study does not have.{suggest(key, [*out.grid.product, *out.grid.zip])}")
        if sc.arms is not None:
            names = [a.name for a in self.arms]
            for a in sc.arms:
                if a not in names:
                    problems.append(f"scale {scale!r} keeps arm {a!r}, which the study does not have.{suggest(a, names)} Arms: {', '.join(names)}.")
            out.arms = [a for a in self.arms if a.name in sc.arms]
        for name, ov in sc.arm_overrides.items():
            arm = next((a for a in out.arms if a.name == name), None)
            if arm is None:
                names = [a.name for a in out.arms]
                problems.append(f"scale {scale!r} has arm_overrides for {name!r}, which is not an arm here.{suggest(str(name), names)} Arms: {', '.join(names)}.")
            elif not isinstance(ov, dict):
                problems.append(f"`scales.{scale}.arm_overrides.{name}` must be a mapping of dotted keys, got {ov!r}.")
            else:
                arm.overrides = {**arm.overrides, **ov}
        if sc.follow_up is not None:
            out.follow_up = _section(FollowUpSection, f"scales.{scale}.follow_up", sc.follow_up, problems)
            if self.commands is not None:
                problems.extend(check_follow_ups(out.follow_up, self.commands))
        if problems:
            raise ConfigError(problems)
        out.study.output_dir = sc.output_dir or f"{self.output_dir}-{scale}"
        return out


def _resolve_path(p: str, study_path: Optional[Path]) -> Path:
    path = Path(p).expanduser()
    if not path.is_absolute() and study_path is not None:
        near = (study_path.parent / path)
        if near.exists() or not path.exists():
            return near.resolve()
    return path


_CONTROL = {chr(c) for c in range(32)} | {chr(127)}


def name_problem(what: str, name: Any) -> Optional[str]:
    """Why ``name`` cannot name a directory of the study (None when it can): run, arm, study and
    scale names become path components, so ``.``, ``..``, a leading dot (hidden, and ``.study``
    is the study's own state), path separators and control characters are refused."""
    if not isinstance(name, str):
        return f"{what} {name!r} must be a string."
    if name in (".", "..") or name.startswith("."):
        return (f"{what} {name!r} would name a path outside the study directory or a hidden one (.study holds the "
                "study's state); names may not be `.` or `..` or start with a dot. Rename it, e.g. with letters and digits.")
    bad = sorted({c for c in name if c in ("/", "\\") or c in _CONTROL})
    if bad:
        return (f"{what} {name!r} holds {', '.join(repr(c) for c in bad)}: path separators and control characters do not "
                "belong in a name that becomes a directory. Rename it (letters, digits, . _ + = -).")
    return None


def _check_dotted(mapping: Any, where: str, problems: list[str]) -> dict:
    if not isinstance(mapping, dict):
        problems.append(f"`{where}` must be a mapping of dotted keys to values (e.g. {{training.seed: 1}}), got {mapping!r}.")
        return {}
    for k in mapping:
        if not isinstance(k, str) or ("." not in k and k != "method"):
            problems.append(f"`{where}` key {k!r} is not a dotted config key; write section.key (e.g. training.seed) or `method`.")
    return dict(mapping)


def _section(cls: type, name: str, raw: Any, problems: list[str]) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.append(f"`{name}` must be a mapping, got {raw!r}.")
        raw = {}
    return build_section(cls, name, raw, problems)


def spec_from_dict(raw: dict[str, Any], path: Optional[Path] = None, commands: Optional[set[str]] = None) -> StudySpec:
    """Validate a study mapping; every problem is collected and raised once.

    ``commands``: the names of the ``peftlab`` commands follow-up steps may run (the CLI passes
    its command table); None skips checking the follow-up steps."""
    problems: list[str] = []
    for key in raw:
        if key not in TOP_LEVEL:
            problems.append(f"unknown study key `{key}`.{suggest(str(key), TOP_LEVEL)} Study files have: {', '.join(TOP_LEVEL)}.")
    study = _section(StudySection, "study", raw.get("study"), problems)
    if not study.name and path is not None:
        study.name = path.stem
    if not study.name:
        problems.append("`study.name` is missing; name the study (it is recorded in every run's provenance).")
    elif (bad := name_problem("`study.name`", study.name)) is not None:
        problems.append(bad)  # the default study directory is runs/studies/<name>
    base = raw.get("base")
    base_path = None
    if base is not None:
        if not isinstance(base, str):
            problems.append(f"`base` must be the path of a run config, got {base!r}.")
        else:
            base_path = _resolve_path(base, path)
            if not base_path.is_file():
                problems.append(f"`base` config {base!r} does not exist (looked for {base_path}); paths are relative to the study file.")
    overrides = _check_dotted(raw.get("overrides") or {}, "overrides", problems)
    grid = _section(GridSection, "grid", raw.get("grid"), problems)
    for kind in ("product", "zip"):
        axes = _check_dotted(getattr(grid, kind), f"grid.{kind}", problems)
        for k, v in axes.items():
            if not isinstance(v, list) or not v:
                problems.append(f"`grid.{kind}.{k}` must be a non-empty list of values, got {v!r}.")
    zip_lengths = {k: len(v) for k, v in grid.zip.items() if isinstance(v, list)}
    if len(set(zip_lengths.values())) > 1:
        problems.append(f"`grid.zip` lists are walked together and must have one length; got {zip_lengths}. Put independent axes under grid.product.")
    both = set(grid.product) & set(grid.zip)
    if both:
        problems.append(f"grid axes {sorted(both)} are in both grid.product and grid.zip; keep each key in one.")
    arms = []
    raw_arms = raw.get("arms") or []
    if not isinstance(raw_arms, list):
        problems.append(f"`arms` must be a list of {{name: ..., overrides: {{...}}}}, got {raw_arms!r}.")
        raw_arms = []
    for i, a in enumerate(raw_arms):
        arm = _section(ArmSection, f"arms[{i}]", a, problems)
        if not arm.name:
            problems.append(f"`arms[{i}]` has no name; every arm needs one ({{arm}} in run names).")
        elif (bad := name_problem(f"`arms[{i}].name`", arm.name)) is not None:
            problems.append(bad)
        _check_dotted(arm.overrides, f"arms[{i}].overrides", problems)
        clash = sorted(set(arm.overrides) & (set(grid.product) | set(grid.zip)))
        if clash:
            problems.append(f"arm {arm.name!r} sets {clash}, which the grid also varies; set each key in one place.")
        arms.append(arm)
    names = [a.name for a in arms]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        problems.append(f"arm names must be unique; {dup} appear more than once.")
    seeds = raw.get("seeds")
    if seeds is not None:
        if isinstance(seeds, int) and not isinstance(seeds, bool):
            seeds = [seeds]
        if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
            problems.append(f"`seeds` must be a list of integers (e.g. [42, 123, 999]), got {seeds!r}.")
            seeds = None
        elif len(set(seeds)) != len(seeds):
            problems.append(f"`seeds` lists a seed twice: {seeds}.")
    budget = _section(BudgetSection, "budget", raw.get("budget"), problems)
    if budget.match != "none" and budget.match not in METHODS:
        problems.append(f"`budget.match` {budget.match!r} is neither none nor a method.{suggest(str(budget.match), METHODS)} "
                        f"Methods: {', '.join(sorted(METHODS))}.")
    if budget.r is not None and budget.r < 1:
        problems.append(f"`budget.r` must be at least 1, got {budget.r}.")
    follow = _section(FollowUpSection, "follow_up", raw.get("follow_up"), problems)
    if commands is not None:
        problems.extend(check_follow_ups(follow, commands))
    execution = _section(ExecutionSection, "execution", raw.get("execution"), problems)
    if execution.processes_per_run < 1:
        problems.append(f"`execution.processes_per_run` must be at least 1, got {execution.processes_per_run}.")
    if execution.cpu_runs < 1:
        problems.append(f"`execution.cpu_runs` must be at least 1, got {execution.cpu_runs}.")
    if execution.max_attempts_same_error < 1:
        problems.append(f"`execution.max_attempts_same_error` must be at least 1, got {execution.max_attempts_same_error}.")
    scales = {}
    raw_scales = raw.get("scales") or {}
    if not isinstance(raw_scales, dict):
        problems.append(f"`scales` must map a scale name to its changes, e.g. {{cpu: {{seeds: [42]}}}}, got {raw_scales!r}.")
        raw_scales = {}
    for name, sc in raw_scales.items():
        if (bad := name_problem("scale name", name)) is not None:
            problems.append(bad)  # the scale's default study directory is <study dir>-<scale>
        scale = _section(ScaleSection, f"scales.{name}", sc, problems)
        _check_dotted(scale.overrides, f"scales.{name}.overrides", problems)
        if scale.base is not None and not _resolve_path(scale.base, path).is_file():
            problems.append(f"`scales.{name}.base` config {scale.base!r} does not exist; paths are relative to the study file.")
        scales[str(name)] = scale
    if problems:
        raise ConfigError([f"{path}: {p}" if path else p for p in problems])
    return StudySpec(study=study, base=base_path, overrides=overrides, grid=grid, arms=arms, seeds=seeds, budget=budget,
                     follow_up=follow, execution=execution, scales=scales, path=path, commands=commands)


def check_follow_ups(follow: FollowUpSection, commands: set[str]) -> list[str]:
    """Problems with the follow-up steps: each must split into words and name one of ``commands``."""
    problems = []
    for kind in ("before", "per_run", "study"):
        for i, step in enumerate(getattr(follow, kind)):
            try:
                words = shlex.split(step)
            except ValueError as e:
                problems.append(f"`follow_up.{kind}[{i}]` {step!r} cannot be split into words: {e}.")
                continue
            if not words:
                problems.append(f"`follow_up.{kind}[{i}]` is empty.")
                continue
            if words[0] == "peftlab":
                words = words[1:]
            if not words or words[0] not in commands:
                name = words[0] if words else ""
                problems.append(f"`follow_up.{kind}[{i}]`: {name!r} is not a peftlab command in this installation.{suggest(name, commands)} "
                                f"Commands: {', '.join(sorted(commands))}.")
    return problems


def load_study(path: str | Path, scale: Optional[str] = None, follow_ups: bool = True,
               commands: Optional[set[str]] = None) -> StudySpec:
    """Read and validate a study file, optionally at a named scale (``--preset-scale``).

    ``commands``: the ``peftlab`` commands follow-up steps may name (None: not checked).
    ``follow_ups=False`` drops the follow-up steps (and does not check them)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError([f"study file {str(p)!r} does not exist; shipped studies live in configs/studies/ (e.g. configs/studies/compare.yaml)."])
    try:
        raw = yaml.safe_load(read_text(p, "study file"))
    except PeftlabError as e:
        raise ConfigError([str(e)]) from None
    except yaml.YAMLError as e:
        raise ConfigError([f"{p} is not valid YAML: {e}"]) from None
    if raw is None or raw == {}:
        raise ConfigError([f"study file {p} is empty; a study names at least its runs (base:, grid:, arms: or seeds:), "
                           "see configs/studies/ for examples. An empty file would plan one run with every default."])
    if not isinstance(raw, dict):
        raise ConfigError([f"{p} must be a mapping (study:, base:, grid:, arms:, seeds: ...), not {type(raw).__name__}."])
    spec = spec_from_dict(raw, p.resolve(), commands=commands if follow_ups else None).at_scale(scale)
    if not follow_ups:
        spec.follow_up = FollowUpSection()
    return spec


def is_study_file(path: str | Path) -> bool:
    """True when a YAML file looks like a study (has a `study:` or `grid:`/`arms:` section).
    A file that is not UTF-8 is a :class:`PeftlabError` naming its encoding (whatever it holds)."""
    try:
        raw = yaml.safe_load(read_text(Path(path), "YAML file")) or {}
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(raw, dict) and any(k in raw for k in ("study", "grid", "arms", "seeds", "scales"))


__all__ = ["StudySpec", "load_study", "spec_from_dict", "is_study_file"]
