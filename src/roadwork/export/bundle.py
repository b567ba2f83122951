"""The bundle: the deployable unit. No torch needed to read or run it.

    bundle/
      model.onnx      the network (dynamic batch)
      model.json      architecture, class names, preprocessing
      policy.json     the TrustPolicy (calibration, conformal threshold, certified abstention, cascade gate),
                      certified on the outputs of this very path (cascade included)
      policy-int8.json  with an int8 model: its own policy, certified on the int8 model's outputs
      policy-openvino-*.json  with OpenVINO variants (model.onnx compiled by OpenVINO, f32 or bf16): theirs
      model-openvino-int8.xml/.bin  with export.openvino=true: the NNCF int8 OpenVINO IR (policy-openvino-int8.json)
      runtime.json    after ``roadwork bench BUNDLE select=true``: the variant measured fastest within the
                      accuracy/ECE budget on that machine (``Bundle.load(variant="auto")`` serves it)
      reference.json  the calibration split through the served policy (drift monitoring)
      stage*-...      earlier cascade stages, when there is a cascade: a tree table (JSON) or an ONNX
                      network with its model.json
      manifest.json   schema, sha256 and size of every file above, library versions, export parity

:meth:`Bundle.load` refuses a bundle whose files do not match the manifest's hashes, naming the file, and a JSON
file of it that is malformed (:func:`roadwork.jsonio.parse_artifact`). Every manifest is written by
:func:`write_manifest`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import platform
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from PIL import Image

from roadwork.data.preprocess import load_rgb, preprocess
from roadwork.errors import ArtifactError, InputError
from roadwork.export.onnx import onnx_logits
from roadwork.export.runtime import RuntimeSpec, open_session, runtime_status
from roadwork.export.snapshot import MANIFEST_FILE, snapshot
from roadwork.jsonio import parse_artifact, write_json
from roadwork.models.factory import ModelCard
from roadwork.models.trees import TreeEnsemble
from roadwork.trust.policy import PolicyOutput, TrustPolicy

__all__ = [
    "BATCH_DEPENDENT",
    "BUNDLE_SCHEMA",
    "RUNTIME_FILE",
    "Bundle",
    "StageInputs",
    "batch_dependent",
    "bundle_name",
    "file_sha256",
    "open_image",
    "record_runtime_choice",
    "write_bundle",
    "write_manifest",
]

BUNDLE_SCHEMA = 1
"""The bundle layout version written to ``manifest.json``."""
_FILES = ("model.onnx", "model.json", "policy.json")
RUNTIME_FILE = "runtime.json"
"""Where ``roadwork bench BUNDLE select=true`` records the selected variant (hashed in the manifest)."""
log = logging.getLogger(__name__)
_T = TypeVar("_T")
_REEXPORT = "Re-export the bundle (roadwork export, with the run's config); do not edit it."


def file_sha256(path: Path) -> str:
    """The hex sha256 of a file's bytes (read in 1 MiB blocks), as the manifest lists it."""
    return _sha256_and_size(path)[0]


def _sha256_and_size(path: Path) -> tuple[str, int]:
    """The hex sha256 of a file's bytes and how many there are, from one read."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def write_manifest(folder: Path, manifest: Mapping[str, Any], hashed: Iterable[str] = ()) -> dict[str, Any]:
    """Write ``folder/manifest.json`` whole (a temporary file, renamed) and return it: ``manifest`` with the sha256
    (``files``) and byte count (``sizes``) of each file named in ``hashed``, read from ``folder``; the other files
    keep the digest and size ``manifest`` gives (a file with no size, from a bundle exported before sizes were
    recorded, keeps none). Every bundle manifest is written here: the export, ``roadwork bench select=true`` and
    ``roadwork recertify``; a signature covers the sizes with the rest."""
    files, sizes = dict(manifest.get("files", {})), dict(manifest.get("sizes", {}))
    for name in hashed:
        files[name], sizes[name] = _sha256_and_size(folder / name)
    out: dict[str, Any] = {}
    for key, value in {"schema": BUNDLE_SCHEMA, **manifest, "files": files}.items():
        if key == "sizes":
            continue
        out[key] = value
        if key == "files":  # the sizes beside the hashes, in the same order
            out["sizes"] = {n: sizes[n] for n in files if n in sizes}
    tmp = folder / f".{MANIFEST_FILE}.tmp"
    try:
        write_json(tmp, out)
        tmp.replace(folder / MANIFEST_FILE)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def _read_json(
    root: Path,
    name: str,
    source: Path,
    build: Callable[[dict[str, Any]], _T],
    what: str,
    fix: str = _REEXPORT,
) -> _T:
    """``build`` of the bundle's JSON file ``name``: read from the verified private copy ``root``, named in errors
    as the bundle folder's file (``source/name``). Every JSON file of a bundle is read here; anything malformed
    is an :class:`ArtifactError` (:func:`roadwork.jsonio.parse_artifact`)."""
    try:
        data = (root / name).read_bytes()
    except OSError as e:
        raise ArtifactError(
            f"Bundle file {str(source / name)!r} could not be read ({e.strerror or e})."
        ) from None
    return parse_artifact(data, build, where=str(source / name), what=what, fix=fix)


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for pkg in ("roadwork", "numpy", "onnxruntime", "openvino", "nncf", "onnx", "torch", "timm"):
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
    variants: Mapping[str, tuple[Path | None, dict[str, Any]]] | None = None,
    extra_files: Mapping[str, Path] | None = None,
) -> None:
    """Write a bundle folder and its manifest. ``variants``: other forms of the model (``{"int8": (path, info)}``),
    stored as ``model-<name>.onnx`` (an OpenVINO IR ``*.xml`` as ``model-<name>.xml`` with its ``.bin``); a
    variant with no file of its own (``(None, info)``: another runtime or precision of ``model.onnx``) points
    at ``model.onnx``. ``extra_files``: name in the bundle → file (the cascade's earlier stages, policies)."""
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
        fname = "model.onnx"
        if path is not None:
            fname = f"model-{name}{'.xml' if path.suffix == '.xml' else '.onnx'}"
            shutil.copyfile(path, out_dir / fname)
            files.append(fname)
            if path.suffix == ".xml":  # an OpenVINO IR: its weights beside it, hashed with the rest
                shutil.copyfile(path.with_suffix(".bin"), out_dir / f"model-{name}.bin")
                files.append(f"model-{name}.bin")
        described[name] = {"file": fname, **info}
    manifest = {
        "schema": BUNDLE_SCHEMA,
        "files": {},
        "classes": card.classes,
        "versions": _versions(),
        "export": export_info,
        "variants": described,
    }
    write_manifest(out_dir, manifest, files)


def _auto_variant(
    root: Path, source: Path, manifest: dict[str, Any], threads: int
) -> tuple[str, int, dict[str, Any]]:
    """The variant ``runtime.json`` names (hashed with the rest by the snapshot), if it can run here."""
    if RUNTIME_FILE not in manifest["files"]:
        return (
            "fp32",
            threads,
            {"recorded": None, "reason": "no runtime.json: roadwork bench BUNDLE select=true"},
        )
    fix = "Run roadwork bench BUNDLE select=true again, or load a named variant."
    rec = _read_json(root, RUNTIME_FILE, source, _runtime_choice, "runtime choice", fix)
    name, info = rec["variant"], manifest.get("variants", {}).get(rec["variant"])
    if name != "fp32" and info is None:
        raise ArtifactError(
            f"{RUNTIME_FILE} selects {name!r}, which the bundle's manifest does not list. {fix}"
        )
    status = "ok" if name == "fp32" else runtime_status(RuntimeSpec.from_variant(name, info))
    if batch_dependent(info):
        status = BATCH_DEPENDENT
    if status != "ok":
        log.warning(
            "variant=auto: %s was selected on %s but %s here; serving fp32", name, rec.get("cpu"), status
        )
        return "fp32", threads, {"recorded": name, "reason": status}
    return name, threads or int(rec.get("threads", 0)), {"recorded": name, "measured_on": rec.get("cpu")}


def _runtime_choice(rec: dict[str, Any]) -> dict[str, Any]:
    """``runtime.json``'s record, if it names a variant and a count of threads."""
    if not isinstance(rec.get("variant"), str):
        raise ArtifactError(f"its 'variant' is {str(rec.get('variant'))[:40]!r}, not a variant's name")
    threads = rec.get("threads", 0)
    if type(threads) is not int or threads < 0:
        raise ArtifactError(f"its 'threads' is {str(threads)[:40]!r}, not a count of threads")
    return rec


def record_runtime_choice(path: str | Path, choice: Mapping[str, Any]) -> Path:
    """Write ``runtime.json`` (``choice["variant"]`` must be fp32 or a variant with its own certified policy)
    into a verified bundle and list its sha256 in the manifest. A signature made before no longer verifies:
    sign the bundle again."""
    root = Path(path)
    bundle = Bundle.load(root)  # verifies every hash first: never re-hash a tampered bundle
    name = choice["variant"]
    known = bundle.manifest.get("variants", {})
    if name != "fp32" and not (name in known and known[name].get("policy")):
        raise ArtifactError(
            f"Cannot select {name!r}: the bundle has no policy certified on its outputs "
            f"(certified: {', '.join(['fp32', *[n for n, v in known.items() if v.get('policy')]])})."
        )
    write_json(root / RUNTIME_FILE, dict(choice))
    write_manifest(root, bundle.manifest, [RUNTIME_FILE])
    return root / RUNTIME_FILE


def open_image(path: str | Path, min_side: int | None = None) -> Image.Image:
    """An image file as RGB, decoded to at least ``min_side`` (the bundle's :attr:`Bundle.decode_side`, so JPEG
    DCT scaling matches the certified outputs); an unreadable file raises :class:`InputError` naming it."""
    try:
        return load_rgb(path, min_side)
    except Exception as e:  # PIL raises many types for bad files
        raise InputError(
            f"Cannot read image {str(path)!r} ({type(e).__name__}: {e}); pass a readable JPEG/PNG/BMP/WebP/TIFF/GIF file."
        ) from None


@dataclass(frozen=True)
class StageInputs:
    """What each stage of a bundle runs on, for a batch of images (:meth:`Bundle.stage_inputs`): one array per
    stage (the cascade's, then the model's), rows in image order."""

    arrays: tuple[np.ndarray, ...]

    def __len__(self) -> int:
        return len(self.arrays[-1])

    @staticmethod
    def concat(parts: Sequence[StageInputs]) -> StageInputs:
        """One batch from several requests' inputs."""
        return StageInputs(tuple(np.concatenate(a) for a in zip(*(p.arrays for p in parts), strict=True)))


def bundle_name(manifest: dict[str, Any], path: Path) -> str:
    """A bundle's model name: the manifest's ``name``, else its folder's name, or the run's name for a bundle in
    its run folder (``runs/demo/export/bundle`` → ``demo``). ``roadwork recertify`` writes it into the new
    version's manifest, so every version of a model serves under one name."""
    name = manifest.get("name")
    if isinstance(name, str) and name:
        return name
    p = Path(path).resolve()
    if p.name == "bundle" and p.parent.name == "export" and p.parent.parent.name:
        return p.parent.parent.name
    return p.name


@dataclass
class Bundle:
    """A verified bundle, opened: its model session (the variant's runtime × precision), the policy certified on
    that variant's outputs, the cascade's earlier stages and the manifest. Build it with :meth:`load`."""

    path: Path
    card: ModelCard
    policy: TrustPolicy
    manifest: dict[str, Any]
    session: Any
    stage_runners: list[Any] | None = None  # the cascade's earlier stages (StageRunner), in order
    variant: str = "fp32"
    runtime: dict[str, Any] = field(default_factory=dict)  # runtime, precision, threads: what runs the model
    model_policy: TrustPolicy | None = (
        None  # with a cascade: the policy certified on the model alone's outputs
    )
    reference: list[dict[str, Any]] | None = None  # reference.json's rows: the calibration split (drift)

    @property
    def tensor_policy(self) -> TrustPolicy:
        """The policy for preprocessed tensors (``/v2`` infer, Triton): the model alone's certified one when the
        main policy has a cascade (which needs decoded images), else the main policy."""
        return self.model_policy if self.model_policy is not None else self.policy

    @property
    def policy_file(self) -> str:
        """The file :attr:`policy` was read from (this variant's own)."""
        return _variant_files(self.path, self.manifest, self.variant)[1]

    @property
    def policy_version(self) -> str:
        """The version clients see: the first 12 hex digits of the sha256 of :attr:`policy_file`."""
        return str(self.manifest["files"][self.policy_file])[:12]

    @property
    def tensor_policy_version(self) -> str:
        """The ``policy_version`` of what ``/v2`` tensors are decided under (:attr:`tensor_policy_file`)."""
        return str(self.manifest["files"][self.tensor_policy_file])[:12]

    @property
    def tensor_policy_file(self) -> str:
        """The file :attr:`tensor_policy` was read from (this variant's own)."""
        if self.model_policy is None:
            return _variant_files(self.path, self.manifest, self.variant)[1]
        if self.variant != "fp32":
            return str(self.manifest["variants"][self.variant]["model_policy"])
        return str(self.manifest["export"]["model_policy"]["file"])

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        threads: int = 0,
        variant: str = "fp32",
        require_signature: str | Path | None = None,
    ) -> Bundle:
        """Verify every hash in ``manifest.json``, then open the model and its policy. ``variant``: ``fp32``
        (ONNX Runtime), one the manifest lists (``int8``, ``openvino-fp32``, ``openvino-bf16``,
        ``openvino-int8``), or ``auto``: the one ``roadwork bench BUNDLE select=true`` recorded in
        ``runtime.json`` (fp32 without one, or when the recorded runtime cannot run here: logged).
        ``threads=0``: the recorded threads with ``auto``, else the runtime's default. ``require_signature``: a
        public key (PEM); the bundle must carry a valid signature by it.

        The folder is read once (:mod:`roadwork.export.snapshot`): the signature is checked over the manifest's
        bytes before any listed file is opened, only plain regular files inside the folder are read, and what is
        loaded is the copy whose bytes were hashed. Every error names the bundle folder's file."""
        check = None
        if require_signature is not None:
            from roadwork.export.signing import signature_check

            check = signature_check(require_signature, Path(path))
        with snapshot(path, check_signature=check) as snap, _errors_name(Path(path), snap.dir):
            return cls._load_verified(
                Path(path), snap.dir, _check_schema(snap.manifest, Path(path)), threads, variant
            )

    @classmethod
    def _load_verified(
        cls, source: Path, root: Path, manifest: dict[str, Any], threads: int, variant: str
    ) -> Bundle:
        """:meth:`load` from the verified private copy ``root`` of ``source``."""
        choice: dict[str, Any] | None = None
        if variant == "auto":
            variant, threads, choice = _auto_variant(root, source, manifest, threads)
        model_file, policy_file = _variant_files(source, manifest, variant)
        model_policy_file = (manifest.get("export", {}).get("model_policy") or {}).get("file")
        if variant != "fp32":  # each variant's model-alone policy is certified on its own outputs
            model_policy_file = manifest.get("variants", {}).get(variant, {}).get("model_policy")
        # only names the manifest lists (each a plain file name of the private copy) are ever opened: the
        # variant's files first, then the stage files its policy names
        _check_listed(
            manifest["files"], (model_file, policy_file, *([model_policy_file] if model_policy_file else []))
        )
        card = _read_json(root, "model.json", source, ModelCard.from_dict, "model card")
        policy = _read_json(root, policy_file, source, _served_policy, "policy")
        alone = None
        if model_policy_file:
            alone = _read_json(root, model_policy_file, source, _served_policy, "policy")
        _check_listed(manifest["files"], _stage_files(policy))
        # several ONNX Runtime sessions take turns on the same cores: no busy-waiting between runs
        spin = policy.cascade is None or all(st.kind != "network" for st in policy.cascade.stages[:-1])
        runners = _stage_runners(root, source, policy, threads, spin)
        spec = RuntimeSpec.from_variant(variant, manifest.get("variants", {}).get(variant), threads=threads)
        session = open_session(root / model_file, spec, spin=spin)
        info = {"variant": variant, **session.info}
        if choice is not None:
            info["auto"] = choice
        reference = None
        if "reference.json" in manifest["files"]:
            reference = _read_json(root, "reference.json", source, _reference_rows, "drift reference")
        bundle = cls(
            source, card, policy, manifest, session.session, runners, variant, info, alone, reference
        )
        _self_test(bundle)
        return bundle

    @property
    def decode_side(self) -> int:
        """The side every image is decoded to (JPEG DCT scaling): the one the run's predict stage used, recorded
        at export, so the served logits are the certified ones; else the largest resize side of the stages."""
        recorded = self.manifest.get("export", {}).get("decode_side")
        if recorded is not None:
            if type(recorded) is not int or not 1 <= recorded <= _MAX_DECODE_SIDE:
                raise ArtifactError(
                    f"{self.path / MANIFEST_FILE}: its 'export.decode_side' is {str(recorded)[:40]!r}, not a side "
                    f"in pixels from 1 to {_MAX_DECODE_SIDE}; export the bundle again."
                )
            return recorded
        from roadwork.data.features import FEATURE_SPEC
        from roadwork.data.preprocess import decode_side

        specs = [self.card.preprocess]
        specs += [r.spec if r.spec is not None else FEATURE_SPEC for r in self.stage_runners or []]
        return decode_side(*specs)

    def answers_statement(self) -> tuple[str, bool]:
        """What this bundle will do, in one sentence for a log line, and whether it is a warning: the share of
        images its policy answered on the test split (fp32; the calibration rows for a variant) under its
        certified error bound, or that it abstains on every image and what to change."""
        a = self.policy.abstention
        rec = self.manifest.get("export", {}).get("answers") or {}
        on_test = rec.get("test") if self.variant == "fp32" else None
        where = (
            f"{on_test:.0%} of the {rec['test_n']} test images"
            if on_test is not None
            else f"{a.coverage:.0%} of the {a.n} calibration images it was certified on"
        )
        if a.answers == "none" and all(g.answers == "none" for g in a.groups.values()):
            lowest = rec.get("smallest_certifiable_risk")
            hint = (
                f" The smallest target its calibration rows certify is {lowest:g}: rerun with "
                f"selective.target_risk={lowest:g} (same name=),"
                if lowest is not None and lowest < 1
                else " Rerun with a larger selective.target_risk,"
            )
            return (
                f"this bundle abstains on every image (abstain=true, answered {where}): its policy certified no "
                f"confidence threshold for selective risk ≤ {a.target_risk:g} at δ={a.delta:g}.{hint} add labelled "
                "images, or train a stronger model.",
                True,
            )
        return (
            f"this bundle answers about {where.split(' of ')[0]} of images ({where}) with certified selective "
            f"risk ≤ {a.target_risk:g} (δ={a.delta:g}); the others come back abstain=true.",
            False,
        )

    @property
    def classes(self) -> list[str]:
        """The class names, in the order of the logits."""
        return self.card.classes

    def logits(self, images: Sequence[Image.Image], *, batch_size: int = 64) -> np.ndarray:
        """float64 logits (N, K) of the served model on decoded images (preprocessed as the card says)."""
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

    def stage_inputs(self, images: Sequence[Image.Image]) -> StageInputs:
        """Every stage's input at once (the cascade's stages, then the model) for :meth:`predict_inputs`. The
        server prepares them in its decode threads, so that its model thread only runs the stages; the price
        is the later stages' preprocessing for the images an earlier stage answers."""
        runners = self.stage_runners or []
        return StageInputs(
            (*(r.inputs(images) for r in runners), preprocess(list(images), self.card.preprocess))
        )

    def predict_inputs(
        self, inputs: StageInputs, slices: Mapping[str, Sequence[str]] | None = None
    ) -> PolicyOutput:
        """:meth:`predict_images` from :meth:`stage_inputs`: the same outputs (each stage runs on the same rows,
        in the same batches)."""
        runners = self.stage_runners or []
        if len(inputs.arrays) != len(runners) + 1:
            raise InputError(
                f"inputs for {len(inputs.arrays)} stages, but this bundle has {len(runners) + 1}: prepare them "
                "with this bundle's stage_inputs."
            )

        def stage_logits(s: int, rows: np.ndarray) -> np.ndarray:
            x = inputs.arrays[s][rows]
            return (
                runners[s].logits_of(x) if s < len(runners) else onnx_logits(self.session, x, batch_size=64)
            )

        if not runners:
            return self.policy.apply(stage_logits(0, np.arange(len(inputs))), slices)
        return self.policy.apply_cascade(stage_logits, len(inputs), slices)

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
            parts.append(self.predict_images([open_image(p, self.decode_side) for p in chunk], meta))
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
            res = self.predict_images([open_image(p, self.decode_side) for p in chunk], meta)
            for p, rec in zip(chunk, res.records(self.classes), strict=True):
                out.append({"path": str(p), **rec})
        return out


_MAX_DECODE_SIDE = 16384  # pixels: the largest side a bundle may ask images to be decoded to


def _self_test(bundle: Bundle) -> None:
    """Run the served path once on one grey image (every cascade stage, the model, the policy, the ``/v2`` tensor
    policy, the start-up statement): a bundle whose files parse but whose served path fails or answers non-finite
    probabilities is an :class:`ArtifactError`, never a 500 per request. Only fresh objects are touched; no RNG is
    drawn from outside the policy's own seeded ones."""
    try:
        bundle.decode_side  # noqa: B018 - what predict and the server decode to: it must be readable
        grey = [Image.new("RGB", (bundle.card.preprocess.resize_side,) * 2, (128, 128, 128))]
        outs = [bundle.predict_images(grey), bundle.predict_inputs(bundle.stage_inputs(grey))]
        x = preprocess(grey, bundle.card.preprocess)
        outs.append(bundle.tensor_policy.apply(onnx_logits(bundle.session, x, batch_size=1)))
        for out in outs:
            if not np.isfinite(out.probs).all():
                raise ValueError("the policy gives non-finite probabilities")
            out.records(bundle.classes)
        bundle.answers_statement()
    except ArtifactError:  # a field check's own error (it names the file and the fix)
        raise
    except Exception as e:  # anything at all: this is the safety net under the field checks
        raise ArtifactError(
            f"Bundle {str(bundle.path)!r}: its files load but its served path fails ({type(e).__name__}: "
            f"{str(e)[:200]}). {_REEXPORT}"
        ) from None


def _check_schema(manifest: dict[str, Any], source: Path) -> dict[str, Any]:
    """``manifest`` if its schema is this roadwork's and the tables loading reads are tables."""
    if manifest.get("schema") != BUNDLE_SCHEMA:
        raise ArtifactError(f"Bundle schema {manifest.get('schema')!r} is not {BUNDLE_SCHEMA}; re-export it.")
    export, variants = manifest.get("export", {}), manifest.get("variants", {})
    tables = {
        "export": export,
        "export.model_policy": (export.get("model_policy") or {}) if isinstance(export, dict) else {},
        "variants": variants,
        **({f"variants.{n}": v for n, v in variants.items()} if isinstance(variants, dict) else {}),
    }
    for key, value in tables.items():
        if not isinstance(value, dict):
            raise ArtifactError(
                f"{str(source / MANIFEST_FILE)!r} is not a valid bundle manifest: {key!r} is "
                f"{str(value)[:60]!r}, not a table. {_REEXPORT}"
            )
    return manifest


def _reference_rows(reference: dict[str, Any]) -> list[dict[str, Any]] | None:
    """``reference.json``'s rows (the calibration split through the served policy), if they are rows."""
    rows = reference.get("rows")
    if rows is not None and not (isinstance(rows, list) and all(isinstance(r, dict) for r in rows)):
        raise ArtifactError("its 'rows' is not a list of rows")
    return rows


@contextlib.contextmanager
def _errors_name(source: Path, copy: Path) -> Iterator[None]:
    """An error raised while loading from the private ``copy`` (a runtime that cannot open a model, say) names the
    bundle folder's file instead: the copy is gone by the time anyone reads the message."""
    try:
        yield
    except ArtifactError as e:
        if str(copy) not in str(e):
            raise
        raise type(e)(str(e).replace(str(copy), str(source))) from None


BATCH_DEPENDENT = (
    "dynamic int8 is not batch-invariant: ONNX Runtime's dynamic quantisation scales activations over the whole "
    "batch, so an image's logits depend on its batch-mates and the policy certified at one batch size does not "
    "hold at another (the server batches 1 to max_batch_size). Re-export with export.int8=static (fixed scales "
    "calibrated on training images), or serve fp32"
)
"""Why a dynamic-int8 variant is never served (a bundle exported before it was refused may still carry one)."""


def batch_dependent(info: Mapping[str, Any] | None) -> bool:
    """Whether a manifest variant's outputs depend on its batch-mates (dynamic int8)."""
    return bool(info) and info.get("mode") == "dynamic"  # type: ignore[union-attr]


def _variant_files(root: Path, manifest: dict[str, Any], variant: str) -> tuple[str, str]:
    """The model file and the certified policy file of ``variant``."""
    if variant == "fp32":
        return "model.onnx", "policy.json"
    known = manifest.get("variants", {})
    if variant not in known:
        raise ArtifactError(
            f"Bundle {str(root)!r} has no {variant!r} model; it has "
            f"{', '.join(['fp32', *known, 'auto'])}. Export one with export.int8=static or "
            "export.openvino=true."
        )
    if batch_dependent(known[variant]):
        raise ArtifactError(f"variant={variant!r} of {str(root)!r} is refused: {BATCH_DEPENDENT}.")
    model_file, policy_file = known[variant].get("file"), known[variant].get("policy")
    if policy_file is None:
        raise ArtifactError(
            f"Bundle {str(root)!r} has a {variant!r} model but no policy certified on its outputs (it was "
            "exported by an older roadwork); re-export it, or serve the fp32 model."
        )
    if not isinstance(model_file, str) or not isinstance(policy_file, str):
        raise ArtifactError(
            f"{str(root / MANIFEST_FILE)!r} is not a valid bundle manifest: variant {variant!r} names no model "
            f"and policy file. {_REEXPORT}"
        )
    return model_file, policy_file


def _served_policy(d: dict[str, Any]) -> TrustPolicy:
    """The policy in ``d``, if a bundle can run its cascade: each earlier stage a boosting tree table, or a
    network with its model card."""
    policy = TrustPolicy.from_dict(d)
    for st in policy.cascade.stages[:-1] if policy.cascade is not None else []:
        card = st.info.get("card")
        for key, name in (("file", st.file), ("card", card)) if card is not None else (("file", st.file),):
            if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
                raise ArtifactError(
                    f"its cascade stage {str(st.name)[:40]!r} has {key} {str(name)[:40]!r}, not a plain file name"
                )
        if not (st.kind == "boosting" or (st.kind == "network" and st.info.get("card"))):
            raise ArtifactError(
                f"its cascade stage {str(st.name)[:40]!r} is of kind {str(st.kind)[:40]!r} with info "
                f"{str(st.info)[:80]}, not a boosting table or a network with its model card"
            )
    return policy


def _stage_files(policy: TrustPolicy) -> list[object]:
    """The files a policy's cascade stages read (tree tables, networks and their cards)."""
    stages = policy.cascade.stages[:-1] if policy.cascade is not None else []
    return [n for st in stages for n in (st.file, *([st.info["card"]] if st.info.get("card") else []))]


def _check_listed(files: dict[str, str], needed: Sequence[object]) -> None:
    """Every file the variant needs is listed in the manifest (and so was copied and hashed)."""
    for name in dict.fromkeys((*_FILES, *needed)):
        if not isinstance(name, str) or name not in files:
            raise ArtifactError(f"Bundle manifest does not list {name!r}; the bundle is incomplete.")


def _stage_runners(
    root: Path, source: Path, policy: TrustPolicy, threads: int, spin: bool
) -> list[Any] | None:
    """The cascade's earlier stages, opened (``None`` without a cascade)."""
    if policy.cascade is None:
        return None
    from roadwork.export.cascade import StageRunner

    return [
        StageRunner("boosting", trees=_read_json(root, st.file, source, TreeEnsemble.from_dict, "tree table"))
        if st.kind == "boosting"
        else StageRunner.network(
            root / st.file,
            _read_json(root, st.info["card"], source, ModelCard.from_dict, "model card").preprocess,
            threads=threads,
            spin=spin,
        )
        for st in policy.cascade.stages[:-1]
    ]
