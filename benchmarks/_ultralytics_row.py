"""One comparison row: Ultralytics YOLO11n-cls trained from scratch on a roadwork run's own splits.

``ultralytics_row`` reads a roadwork run's ``data/dataset.parquet`` and lays its rows out as the ImageFolder tree
that Ultralytics' classify trainer needs, ``workdir/ds/{train,val,test}/{class}/``, made of symlinks to the original
images (nothing is copied; roadwork's ``calib`` split is not used, as YOLO has no calibration step). It then trains
``yolo11n-cls.yaml`` — random weights, no ``.pt`` is downloaded — on CPU for a wall-clock budget (Ultralytics'
``time=`` argument, in hours, with a large ``epochs`` so that the budget, not the epoch count, stops it), early-stopping
and best-checkpoint selection on ``val`` as Ultralytics does by default, and scores the best checkpoint on the same
test images a roadwork run is evaluated on: top-1 accuracy and AUROC of the positive class (for two classes, the
alphabetically second, as roadwork's ``positive_class`` — ``roadwork`` vs ``no_roadwork``).

Ultralytics wants the network at import and at train time (update checks, analytics, fonts, AMP check with
``yolo11n.pt``). It runs offline here because ``YOLO_OFFLINE`` makes its online check false without a DNS lookup,
``YOLO_AUTOINSTALL=0`` stops it from pip-installing, ``YOLO_CONFIG_DIR`` keeps its settings file under ``workdir``,
settings ``sync=False`` and every integration off (MLflow is installed in this venv and would otherwise log a run),
and the train arguments ``plots=False`` (no Arial.ttf download), ``amp=False`` (no AMP check) and
``pretrained=False``. Requires ``pip install ultralytics`` in the same venv (not a roadwork dependency).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

SPLITS = {"train": "train", "val": "val", "test": "test"}  # roadwork split -> ImageFolder folder
INTEGRATIONS = ("clearml", "comet", "dvc", "mlflow", "raytune", "tensorboard", "wandb")


def _image_folder(dataset_parquet: Path, data_root: Path, root: Path) -> dict[str, list[tuple[Path, str]]]:
    """Symlink each train/val/test row to ``root/split/label/``; returns the (link, label) rows per split."""
    df = pd.read_parquet(dataset_parquet, columns=["path", "label", "split"])
    rows: dict[str, list[tuple[Path, str]]] = {folder: [] for folder in SPLITS.values()}
    for i, (path, label, split) in enumerate(df.itertuples(index=False)):
        if split not in SPLITS:
            continue
        src = Path(path) if Path(path).is_absolute() else data_root / path
        link = root / SPLITS[split] / str(label) / f"{i:06d}_{src.name}"  # index prefix: names stay unique
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink():
            link.unlink()
        link.symlink_to(src.resolve())
        rows[SPLITS[split]].append((link, str(label)))
    return rows


def ultralytics_row(
    dataset_parquet: Path, data_root: Path, *, budget_s: float, image_size: int, seed: int = 0, workdir: Path
) -> dict[str, Any]:
    """Returns {"accuracy": float, "auroc": float, "wall_s": float, "epochs": int, "version": str} on the test split.

    ``wall_s`` is the wall time of ``YOLO.train`` (training, per-epoch validation and the final validation of the
    best checkpoint); the test-split prediction afterwards is not counted. ``epochs`` is the number of epochs begun
    (Ultralytics' own count; the budget may stop the last one part-way). ``workdir/ds`` and ``workdir/runs`` are
    recreated on each call.
    """
    workdir = Path(workdir).resolve()
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_AUTOINSTALL", "0")
    os.environ.setdefault("YOLO_VERBOSE", "False")  # its banners and per-epoch bars would bury the table
    os.environ.setdefault("YOLO_CONFIG_DIR", str(workdir / "ultralytics_config"))
    import ultralytics
    from sklearn.metrics import roc_auc_score
    from ultralytics import YOLO
    from ultralytics.utils import SETTINGS

    SETTINGS.update({"sync": False, **dict.fromkeys(INTEGRATIONS, False)})
    for stale in ("ds", "runs"):  # a reused workdir must not mix in another run's images, csv rows or weights
        shutil.rmtree(workdir / stale, ignore_errors=True)
    rows = _image_folder(Path(dataset_parquet), Path(data_root), workdir / "ds")

    model = YOLO("yolo11n-cls.yaml", task="classify")  # built from the yaml: random weights
    t0 = time.perf_counter()
    model.train(
        data=str(workdir / "ds"),
        epochs=10_000,  # the time budget stops training
        time=budget_s / 3600,
        imgsz=image_size,
        seed=seed,
        deterministic=True,
        device="cpu",
        workers=0,
        pretrained=False,
        amp=False,
        plots=False,
        val=True,
        project=str(workdir / "runs"),
        name="train",
        exist_ok=True,
        verbose=False,
    )
    wall_s = time.perf_counter() - t0
    trainer = model.trainer
    assert trainer is not None
    epochs = int(trainer.epoch) + 1
    best = Path(trainer.best) if Path(trainer.best).exists() else Path(trainer.last)

    test = rows["test"]
    fitted = YOLO(best, task="classify")
    results = fitted.predict(
        [str(p) for p, _ in test], imgsz=image_size, device="cpu", stream=True, verbose=False
    )
    probs = np.stack([r.probs.data.cpu().numpy() for r in results])
    names = fitted.names
    classes = [names[k] for k in range(len(names))]
    y = np.array([classes.index(label) for _, label in test])
    accuracy = float((probs.argmax(1) == y).mean())
    if len(classes) == 2:
        k = classes.index(sorted(classes)[1])
        auroc = float(roc_auc_score(y == k, probs[:, k]))
    else:
        auroc = float(roc_auc_score(y, probs, multi_class="ovr"))
    return {
        "accuracy": accuracy,
        "auroc": auroc,
        "wall_s": wall_s,
        "epochs": epochs,
        "version": ultralytics.__version__,
    }
