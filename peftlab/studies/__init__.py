"""Studies: a grid of runs described by one YAML file, run and resumed as a whole.

    peftlab sweep configs/studies/compare.yaml --preset-scale=cpu --dry-run
    peftlab sweep configs/studies/compare.yaml --preset-scale=cpu
    peftlab estimate configs/studies/subspace_allocation.yaml

* :mod:`.spec`      reads and validates a study file (unknown keys rejected with a suggestion);
* :mod:`.budget`    budget matching: the reference method's parameter count on the run's targets;
* :mod:`.expand`    turns it into trials (grid product x zipped axes x arms x seeds, names, budgets);
* :mod:`.log`       study.log and study.jsonl;
* :mod:`.trial`     one trial: its status, its process under the run's lock, its follow-up steps;
* :mod:`.executors` where a run's process goes: this machine, one GPU (or several) per run, Slurm via submitit;
* :mod:`.runner`    runs the trials (skip finished, resume interrupted, record failures, one study log);
* :mod:`.estimate`  times a few real optimizer steps per distinct configuration and extrapolates.

See docs/studies.md.
"""

from .expand import Trial, expand
from .spec import StudySpec, load_study

__all__ = ["StudySpec", "Trial", "expand", "load_study"]
