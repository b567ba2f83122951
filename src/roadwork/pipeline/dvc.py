"""``roadwork dvc``: the pipeline as a ``dvc.yaml``, for teams that version data and runs with DVC.

Every roadwork stage becomes a DVC stage whose command is the same CLI call (``roadwork run roadwork.yaml
--until <stage>``), whose deps are the folders of the stages it reads (and the data source, when it is a folder
or manifest) and the roadwork source files it runs — the same files roadwork's own cache key hashes
(:attr:`~roadwork.pipeline.runner.Stage.code`), so editing the training loop reruns ``train`` and what follows
while editing the report reruns only ``evaluate`` — whose outs are its run folder, and whose params are the
config sections that change it, read from ``roadwork.yaml``, the resolved configuration written next to
``dvc.yaml``. ``dvc repro`` then reruns what changed; roadwork's own cache agrees with it (a stage DVC reruns
with unchanged inputs is a cache hit).

The file's top-level ``metrics:`` and ``plots:`` name what the run writes, so ``dvc metrics show``,
``dvc metrics diff``, ``dvc plots show`` and ``dvc exp show`` work as for any DVC project: the test metrics
(``evaluate/metrics.json``), the training curves (``train/history.json``), the per-slice accuracy
(``evaluate/slices.csv``) and the report's figures.

Source files are listed one by one, not as a folder: a folder dependency would also hash the ``__pycache__``
files Python writes while the stages run, and the second ``dvc repro`` would rerun everything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from roadwork.config import RunConfig

__all__ = ["dvc_stages"]


def _relative(path: Path, base: Path | None) -> str:
    """``path`` relative to ``base`` (the folder holding dvc.yaml) when it lies below it, else absolute."""
    if base is not None:
        try:
            return path.resolve().relative_to(base.resolve()).as_posix()
        except ValueError:
            pass
    return path.resolve().as_posix()


def dvc_stages(
    cfg: RunConfig, params_file: str = "roadwork.yaml", base: str | Path | None = None
) -> dict[str, Any]:
    """The ``dvc.yaml`` content for ``cfg``.

    Run-folder paths are as ``cfg.root`` gives them (relative to the folder holding both files, or absolute);
    source files are relative to ``base`` — the folder ``dvc.yaml`` is written into — when they lie below it
    (a checkout whose ``src/`` is next to ``dvc.yaml``), else absolute (an installed roadwork).
    """
    from roadwork.pipeline.runner import code_files
    from roadwork.pipeline.stages import STAGES

    where = Path(base) if base is not None else None
    run = Path(cfg.root) / cfg.name
    stages: dict[str, Any] = {}
    for st in STAGES:
        deps = [str(run / d) for d in st.deps]
        if st.name == "data" and cfg.data.source != "synthetic":
            deps.append(cfg.data.source)
        deps += [_relative(f, where) for f in code_files(st.code)]
        sections = sorted(
            {key.split(".")[0] for key in st.config} | ({"data"} if st.name == "data" else set())
        )
        cmd = f"roadwork run {params_file} --until {st.name}"  # ("roadwork predict" is the bundle command)
        entry: dict[str, Any] = {"cmd": cmd, "deps": deps, "outs": [str(run / st.name)]}
        if sections:
            entry["params"] = [{params_file: sections}]
        stages[st.name] = entry
    evaluate, train = run / "evaluate", run / "train"
    return {
        "stages": stages,
        # inside the stages' out folders: DVC reads them without tracking them a second time
        "metrics": [str(evaluate / "metrics.json")],
        "plots": [
            {
                str(train / "history.json"): {
                    "x": "epoch",
                    "y": ["train_loss", "val_loss"],
                    "title": "Training",
                }
            },
            {
                str(evaluate / "slices.csv"): {
                    "x": "accuracy",
                    "y": "slice",
                    "template": "bar_horizontal",
                    "title": "Accuracy per slice (test)",
                }
            },
            str(evaluate / "figures"),
        ],
    }
