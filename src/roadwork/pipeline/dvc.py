"""``roadwork dvc``: the pipeline as a ``dvc.yaml``, for teams that version data and runs with DVC.

Every roadwork stage becomes a DVC stage whose command is the same CLI call (``roadwork run roadwork.yaml
--until <stage>``), whose deps are the folders of the stages it reads (and the data source, when it is a folder
or manifest), whose outs are its run folder, and whose params are the config sections that change it — read
from ``roadwork.yaml``, the resolved configuration written next to ``dvc.yaml``. ``dvc repro`` then reruns
what changed; roadwork's own cache agrees with it (a stage DVC reruns with unchanged inputs is a cache hit).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from roadwork.config import RunConfig

__all__ = ["dvc_stages"]


def dvc_stages(cfg: RunConfig, params_file: str = "roadwork.yaml") -> dict[str, Any]:
    """The ``dvc.yaml`` content for ``cfg`` (paths relative to the folder holding both files)."""
    from roadwork.pipeline.stages import STAGES

    run = Path(cfg.root) / cfg.name
    stages: dict[str, Any] = {}
    for st in STAGES:
        deps = [str(run / d) for d in st.deps]
        if st.name == "data" and cfg.data.source != "synthetic":
            deps.append(cfg.data.source)
        sections = sorted(
            {key.split(".")[0] for key in st.config} | ({"data"} if st.name == "data" else set())
        )
        cmd = f"roadwork run {params_file} --until {st.name}"  # ("roadwork predict" is the bundle command)
        entry: dict[str, Any] = {"cmd": cmd, "outs": [str(run / st.name)]}
        if deps:
            entry["deps"] = deps
        if sections:
            entry["params"] = [{params_file: sections}]
        stages[st.name] = entry
    return {"stages": stages}
