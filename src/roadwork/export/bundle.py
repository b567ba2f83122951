"""The bundle: the deployable unit. No torch needed to read or run it.

    bundle/
      model.onnx      the network (dynamic batch)
      model.json      architecture, class names, preprocessing
      policy.json     the TrustPolicy (calibration, conformal threshold, certified abstention, cascade gate),
                      certified on the outputs of this very path (cascade included)
      policy-int8.json  with an int8 model: its own policy, certified on the int8 model's outputs
      reference.json  the calibration split through the served policy (drift monitoring)
      stage*-...      earlier cascade stages, when there is a cascade: a tree table (JSON) or an ONNX
                      network with its model.json
      manifest.json   schema, sha256 of every file above, library versions, export parity

:meth:`Bundle.load` refuses a bundle whose files do not match the manifest's hashes, naming the file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import platform
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from roadwork.data.preprocess import load_rgb, preprocess
from roadwork.errors import ArtifactError, InputError
from roadwork.export.onnx import onnx_logits, onnx_session
from roadwork.jsonio import write_json
from roadwork.models.factory import ModelCard
from roadwork.trust.policy import PolicyOutput, TrustPolicy

__all__ = ["BUNDLE_SCHEMA", "Bundle", "file_sha256", "write_bundle"]

BUNDLE_SCHEMA = 1
_FILES = ("model.onnx", "model.json", "policy.json")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for pkg in ("roadwork", "numpy", "onnxruntime", "onnx", "torch", "timm"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[pkg] = metadata.version(pkg)
    return out


def write_bundle(
    out_dir: Path,
    *,
    onnx_path: Path,
    card: ModelCard,
    policy: TrustPolicy,
    export_info: dict[str, Any],
    variants: Mapping[str, tuple[Path, dict[str, Any]]] | None = None,
    extra_files: Mapping[str, Path] | None = None,
) -> None:
    """``variants``: other forms of the model (``{"int8": (path, info)}``), stored as ``model-<name>.onnx``;
    ``extra_files``: name in the bundle → file (the cascade's earlier stages)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(onnx_path, out_dir / "model.onnx")
    (out_dir / "model.json").write_text(json.dumps(card.to_dict(), indent=2))
    policy.save(out_dir / "policy.json")
    files = list(_FILES)
    for name, src in (extra_files or {}).items():
        shutil.copyfile(src, out_dir / name)
        files.append(name)
    described: dict[str, Any] = {}
    for name, (path, info) in (variants or {}).items():
        fname = f"model-{name}.onnx"
        shutil.copyfile(path, out_dir / fname)
        files.append(fname)
        described[name] = {"file": fname, **info}
    manifest = {
        "schema": BUNDLE_SCHEMA,
        "files": {name: file_sha256(out_dir / name) for name in files},
        "classes": card.classes,
        "versions": _versions(),
        "export": export_info,
        "variants": described,
    }
    write_json(out_dir / "manifest.json", manifest)


def _open(path: str | Path) -> Image.Image:
    try:
        return load_rgb(path)
    except Exception as e:  # PIL raises many types for bad files
        raise InputError(
            f"Cannot read image {str(path)!r} ({type(e).__name__}: {e}); pass a readable JPEG/PNG/BMP/WebP file."
        ) from None


@dataclass
class Bundle:
    path: Path
    card: ModelCard
    policy: TrustPolicy
    manifest: dict[str, Any]
    session: Any
    stage_runners: list[Any] | None = None  # the cascade's earlier stages (StageRunner), in order

    @classmethod
    def load(cls, path: str | Path, *, threads: int = 0, variant: str = "fp32") -> Bundle:
        """Verify every hash in ``manifest.json``, then open the ONNX model (``variant``: ``fp32`` or one the
        manifest lists, e.g. ``int8``) and the policy."""
        root = Path(path)
        mpath = root / "manifest.json"
        if not mpath.is_file():
            raise ArtifactError(
                f"{str(root)!r} is not a roadwork bundle: it has no manifest.json. Pass the bundle "
                "folder written by 'roadwork run' (runs/<name>/export/bundle)."
            )
        try:
            manifest = json.loads(mpath.read_text())
            files = manifest["files"]
        except (ValueError, KeyError) as e:
            raise ArtifactError(f"{str(mpath)!r} is not a valid bundle manifest: {e}") from None
        if manifest.get("schema") != BUNDLE_SCHEMA:
            raise ArtifactError(
                f"Bundle schema {manifest.get('schema')!r} is not {BUNDLE_SCHEMA}; re-export it."
            )
        model_file, policy_file = "model.onnx", "policy.json"
        if variant != "fp32":
            known = manifest.get("variants", {})
            if variant not in known:
                raise ArtifactError(
                    f"Bundle {str(root)!r} has no {variant!r} model; it has "
                    f"{', '.join(['fp32', *known])}. Export one with export.int8=dynamic|static."
                )
            model_file = known[variant]["file"]
            policy_file = known[variant].get("policy")
            if policy_file is None:
                raise ArtifactError(
                    f"Bundle {str(root)!r} has a {variant!r} model but no policy certified on its outputs (it was "
                    "exported by an older roadwork); re-export it, or serve the fp32 model."
                )
        policy_files = []
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            stages = (json.loads((root / policy_file).read_text()).get("cascade") or {}).get("stages", [])
            policy_files = [
                n for st in stages[:-1] for n in (st["file"], st.get("info", {}).get("card")) if n
            ]
        # every file the manifest lists (reference.json too), plus those this variant needs
        for name in dict.fromkeys((*_FILES, model_file, policy_file, *policy_files, *files)):
            f = root / name
            if name not in files:
                raise ArtifactError(f"Bundle manifest does not list {name!r}; the bundle is incomplete.")
            if not f.is_file():
                raise ArtifactError(f"Bundle file {name!r} is missing from {str(root)!r}.")
            if file_sha256(f) != files[name]:
                raise ArtifactError(
                    f"Bundle file {name!r} does not match its sha256 in manifest.json: it was "
                    "modified or corrupted after export. Re-export the bundle; do not edit it."
                )
        card = ModelCard.load(root / "model.json")
        policy = TrustPolicy.load(root / policy_file)
        runners = None
        # several ONNX Runtime sessions take turns on the same cores: no busy-waiting between runs
        spin = policy.cascade is None or all(st.kind != "network" for st in policy.cascade.stages[:-1])
        if policy.cascade is not None:
            from roadwork.export.cascade import StageRunner

            runners = [
                StageRunner.boosting(root / st.file)
                if st.kind == "boosting"
                else StageRunner.network(
                    root / st.file,
                    ModelCard.load(root / st.info["card"]).preprocess,
                    threads=threads,
                    spin=spin,
                )
                for st in policy.cascade.stages[:-1]
            ]
        return cls(
            root, card, policy, manifest, onnx_session(root / model_file, threads=threads, spin=spin), runners
        )

    @property
    def classes(self) -> list[str]:
        return self.card.classes

    def logits(self, images: Sequence[Image.Image], *, batch_size: int = 64) -> np.ndarray:
        x = preprocess(list(images), self.card.preprocess)
        return onnx_logits(self.session, x, batch_size=batch_size)

    def predict_images(
        self, images: Sequence[Image.Image], slices: Mapping[str, Sequence[str]] | None = None
    ) -> PolicyOutput:
        """``slices``: per-image metadata (e.g. ``{"weather": [...]}``) for a per-slice calibrator or Mondrian by
        group (see ``policy.slice_columns``); without it the global calibrator and threshold apply. With a
        cascade, each stage sees only the images the earlier stages did not answer."""
        if self.stage_runners is None:
            return self.policy.apply(self.logits(images), slices)
        runners = self.stage_runners

        def stage_logits(s: int, rows: np.ndarray) -> np.ndarray:
            sub = [images[i] for i in rows]
            return runners[s].logits(sub) if s < len(runners) else self.logits(sub)

        return self.policy.apply_cascade(stage_logits, len(images), slices)

    def predict_output(
        self,
        paths: Sequence[str | Path],
        *,
        batch_size: int = 64,
        slices: Mapping[str, Any] | None = None,
    ) -> PolicyOutput:
        """The served outputs (probabilities, sets, abstain, stage, ...) for a list of image files, batch by
        batch through :meth:`predict_images` — what the evaluate stage scores."""
        from roadwork.trust.policy import concat_outputs

        parts = []
        for i in range(0, len(paths), batch_size):
            chunk = paths[i : i + batch_size]
            meta = None if slices is None else {k: list(v)[i : i + batch_size] for k, v in slices.items()}
            parts.append(self.predict_images([_open(p) for p in chunk], meta))
        if not parts:
            return self.policy.apply(np.zeros((0, len(self.classes))))
        return concat_outputs(parts)

    def predict_paths(
        self,
        paths: Sequence[str | Path],
        *,
        batch_size: int = 64,
        slices: Mapping[str, Sequence[str]] | None = None,
    ) -> list[dict[str, Any]]:
        """One record per image (label, probability, prediction set, abstain[, score]) with its path."""
        out: list[dict[str, Any]] = []
        for i in range(0, len(paths), batch_size):
            chunk = paths[i : i + batch_size]
            meta = None if slices is None else {k: list(v)[i : i + batch_size] for k, v in slices.items()}
            res = self.predict_images([_open(p) for p in chunk], meta)
            for p, rec in zip(chunk, res.records(self.classes), strict=True):
                out.append({"path": str(p), **rec})
        return out
