"""Configuration: one Pydantic model per stage, YAML files, ``key=value`` overrides.

Resolution order: model defaults (mirrored in ``configs/default.yaml``) ← a YAML file or preset
(``demo``) ← ``key=value`` overrides (``train.epochs=3``). Values are parsed as YAML scalars/lists
(``3`` → int, ``true`` → bool, ``[a, b]`` → list), never with ``eval``. Unknown keys get a
"did you mean" suggestion; invalid values fail before any work starts, naming key, value and what is
allowed.
"""

from __future__ import annotations

import difflib
import re
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from roadwork.errors import ConfigError
from roadwork.trust.calibration import CalibrationMethod

__all__ = [
    "CalibrateConfig",
    "CascadeConfig",
    "CascadeNetConfig",
    "ConformalConfig",
    "DataConfig",
    "EvaluateConfig",
    "ExportConfig",
    "ModelConfig",
    "PolicyConfig",
    "RunConfig",
    "SelectiveConfig",
    "SplitConfig",
    "SyntheticConfig",
    "TrackingConfig",
    "TrainConfig",
    "dump_config",
    "load_config",
    "merge_values",
    "parse_overrides",
    "preset_names",
    "yaml_load",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SyntheticConfig(_Strict):
    """Procedural roadwork scenes (see :mod:`roadwork.data.synthetic`)."""

    n: int = Field(6000, ge=8, le=10_000_000, description="number of images to generate (at most 10 million)")
    size: int = Field(128, ge=32, le=1024, description="image side in pixels")
    seed: int = Field(0, description="generator seed; same seed, same images")
    positive_fraction: float = Field(0.5, gt=0, lt=1, description="share of work-zone images")
    domain_b_fraction: float = Field(0.5, ge=0, le=1, description="share of images in visual style B")
    label_noise: float = Field(0.0, ge=0, lt=0.5, description="rate of flipped labels (recorded per image)")
    workers: int = Field(0, ge=0, description="processes for generation; 0 = all cores")


class SplitConfig(_Strict):
    """Fractions of the stable, hash-based split. They must sum to 1."""

    train: float = Field(0.5, gt=0, lt=1)
    val: float = Field(0.1, gt=0, lt=1)
    calib: float = Field(0.2, gt=0, lt=1)
    test: float = Field(0.2, gt=0, lt=1)
    salt: str = Field("roadwork", description="changing it reshuffles every split")

    @model_validator(mode="after")
    def _sums_to_one(self) -> SplitConfig:
        total = self.train + self.val + self.calib + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"split fractions must sum to 1 (train+val+calib+test); they sum to {total:g}")
        return self


class DataConfig(_Strict):
    """Where the labelled images come from and which of them are usable (``data.*``)."""

    source: str = Field(
        "synthetic",
        description="'synthetic', an image folder (one subfolder per class), or a CSV/Parquet manifest",
    )
    synthetic: SyntheticConfig = SyntheticConfig()
    splits: SplitConfig = SplitConfig()
    min_per_class: int = Field(10, ge=2, description="a class with fewer usable images is an error")
    max_pixels: int = Field(40_000_000, ge=1, description="larger images are skipped (decompression bombs)")
    max_file_mb: float = Field(64.0, gt=0, description="larger files are skipped")
    workers: int = Field(
        0,
        ge=0,
        description="processes that check (decode and hash) a folder's or manifest's images; 0: one per core",
    )


class ModelConfig(_Strict):
    """The network: a timm or Hugging Face backbone, its input side, head and pooling (``model.*``)."""

    backbone: str = Field(
        "resnet10t",
        description="a timm model name, or hf:<model id | model type> for Hugging Face transformers backbones",
    )
    pretrained: bool = Field(False, description="download pretrained weights from the hub")
    weights: str | None = Field(
        None, description="local weights: a .safetensors file, or a save_pretrained folder for hf: backbones"
    )
    strict: bool = Field(
        True,
        description="weights (model.weights, an ExPLoRA backbone) must fit the model but for the classifier head; "
        "false: load what fits and list what was skipped",
    )
    image_size: int = Field(96, ge=16, le=1024, description="network input side in pixels")
    drop_rate: float = Field(0.1, ge=0, lt=1)
    kwargs: dict[str, Any] = Field(
        default_factory=dict, description="extra timm.create_model arguments (config fields for hf: types)"
    )
    head: Literal["linear", "mlp"] = Field("linear", description="classifier head on the pooled features")
    pooling: Literal["default", "cls", "mean", "cls+mean"] = Field(
        "default",
        description="token pooling: the backbone's own, CLS, mean of patches, or both (DINOv2 probe)",
    )


class TrainConfig(_Strict):
    """How the model is trained: fine-tuning mode, optimiser, augmentation, devices, caching (``train.*``)."""

    finetune: Literal["full", "linear_probe", "lora", "dora", "doran", "rslora"] = Field(
        "full",
        description="full fine-tuning, a linear probe, or peft adapters (merged before export); doran is DoRA "
        "with DoRAN's learnable offset in the norm",
    )
    lora_rank: int = Field(8, ge=1, description="adapter rank r")
    lora_alpha: float = Field(16.0, gt=0, description="adapter scale α (α/r, or α/√r for rslora)")
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | None = Field(
        None, description="modules that get adapters; null: per architecture"
    )
    accumulate: int = Field(1, ge=1, description="gradient accumulation steps per optimizer step")
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.02, ge=0)
    warmup_epochs: float = Field(0.5, ge=0)
    patience: int = Field(4, ge=1, description="epochs without val improvement before stopping")
    augment: Literal["none", "light", "standard", "strong"] = Field(
        "light",
        description="none; light (flip, small shift, brightness/contrast); standard (RandomResizedCrop, flip, "
        "TrivialAugmentWide, ColorJitter, RandomErasing); strong (RandAugment, wider crops). true/false: light/none",
    )
    mixup: float = Field(0.0, ge=0, description="MixUp Beta(α, α) of image pairs; 0: off (e.g. 0.2)")
    cutmix: float = Field(
        0.0, ge=0, description="CutMix Beta(α, α); 0: off (e.g. 1.0); both set: one per batch"
    )
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    ema: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="EMA decay of the weights (e.g. 0.999), warmed up as min(decay, (1+t)/(10+t)) "
        "over the t-th step; the EMA is what is validated and kept",
    )
    layer_decay: float | None = Field(
        None, gt=0, le=1, description="layer-wise LR decay for ViTs (e.g. 0.75): block i gets lr·d^(L-i)"
    )
    grad_checkpointing: bool = Field(False, description="recompute activations in backward (timm models)")
    compile: bool = Field(
        False, description="torch.compile the training model (first epoch pays the compile)"
    )
    devices: int = Field(1, ge=1, description="data-parallel processes (DDP or FSDP2; gloo on CPU)")
    strategy: Literal["auto", "ddp", "fsdp"] = Field(
        "auto",
        description="with devices > 1: ddp (auto), or fsdp: FSDP2 fully_shard per block, for backbones too big "
        "for one device (no EMA, compile or resumable checkpoints yet)",
    )
    compile_backend: str = Field(
        "inductor", description="torch.compile backend (inductor; aot_eager to debug)"
    )
    class_balance: Literal["none", "weights", "sampler"] = Field(
        "none", description="inverse-frequency loss weights, or a class-balanced sampler"
    )
    recipe: Literal["supervised", "explora"] = Field(
        "supervised", description="explora: self-supervised pre-training on train.unlabeled first (ViTs)"
    )
    unlabeled: str | None = Field(None, description="folder of unlabelled target-domain images (explora)")
    ssl_epochs: int = Field(5, ge=1, description="explora: self-supervised epochs")
    explora_unfreeze: int = Field(1, ge=0, description="explora: last blocks fully unfrozen")
    loss: Literal["ce", "gatekeeper"] = Field(
        "ce", description="gatekeeper: α·CE on correct rows + (1-α)·KL(p‖uniform) on wrong ones (cascades)"
    )
    gatekeeper_alpha: float = Field(0.5, gt=0, le=1, description="α of the gatekeeper loss")
    seed: int = 0
    accelerator: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    precision: Literal["32-true", "bf16-mixed", "16-mixed"] = "32-true"
    threads: int = Field(0, ge=0, description="torch CPU threads; 0 = all cores")
    workers: int = Field(
        1,
        ge=0,
        description="processes that read + augment batches while training (a torch DataLoader); 1: this one "
        "(best on CPU, where the cores are training), 0: one per core",
    )
    decode_workers: int = Field(
        0,
        ge=0,
        description="processes that decode images into the disk cache, once, before training; 0: one per core",
    )
    cache: Literal["disk", "memory"] = Field(
        "disk",
        description="decoded training images: a uint8 file read per batch (RSS flat in the number of images), "
        "or all in RAM (always with devices > 1)",
    )
    cache_dir: str | None = Field(
        None,
        description="folder of decoded-image caches (keyed on image sha256 + preprocessing) reused across runs; "
        "null: ROOT/cache in a pipeline run, a temporary one in train_model",
    )

    @field_validator("augment", mode="before")
    @classmethod
    def _augment_from_bool(cls, v: Any) -> Any:
        """Old configs say ``augment: true|false``: the hand-written augmentation (now ``light``) or none."""
        if isinstance(v, bool):
            return "light" if v else "none"
        return v


class CalibrateConfig(_Strict):
    """Post-hoc calibration of the model's probabilities on the calibration split (``calibrate.*``)."""

    method: CalibrationMethod = Field(
        "temperature", description="'auto' picks by cross-validated NLL on the calibration split"
    )
    per_slice: str | None = Field(
        None, description="a slice column (e.g. weather): fit the method per value, global fallback"
    )
    min_slice_count: int = Field(
        200, ge=10, description="calibration rows a slice value needs for its own fit"
    )
    fit_fraction: float | None = Field(
        None,
        gt=0,
        le=1,
        description="share of the calibration split that fits the calibrator; the rest fits conformal, "
        "abstention and risk control. 1: share all rows. null: 1 for none/temperature, else 0.3",
    )


class ConformalConfig(_Strict):
    """Split-conformal prediction sets with coverage ≥ 1-α, optionally per class or group (``conformal.*``)."""

    method: Literal["lac", "aps", "raps"] = "lac"
    alpha: float = Field(0.1, gt=0, lt=1, description="miscoverage level: sets contain the label w.p. ≥ 1-α")
    randomized: bool = Field(
        False,
        description="randomised APS/RAPS sets (coverage exact up to 1/(n+1)); false: the deterministic "
        "superset (MAPIE's include_last_label=True), coverage ≥ 1-α",
    )
    mondrian: Literal["none", "class", "group"] = Field(
        "none",
        description="'class': coverage ≥ 1-α within every class; 'group': within every value of group_by",
    )
    group_by: str | None = Field(None, description="slice column for mondrian=group (e.g. weather)")
    allow_empty: bool = Field(True, description="false: an empty set gets the top class")
    label_flip_rate: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="rate f at which calibration labels were flipped to another class (what users know); "
        "converted to the noise model's ε = f·K/(K-1). Use it or label_noise, not both",
    )
    label_noise: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="known rate of calibration labels resampled uniformly at random; corrects the "
        "threshold (Clarkson et al., 2024). A flip rate f to another class is f·K/(K-1)",
    )

    @model_validator(mode="after")
    def _group_needs_column(self) -> ConformalConfig:
        if self.mondrian == "group" and not self.group_by:
            raise ValueError(
                "mondrian=group needs conformal.group_by=COLUMN (a slice column such as weather)"
            )
        if self.mondrian == "class" and self.label_noise:
            raise ValueError("label_noise cannot be combined with mondrian=class; use mondrian=none or group")
        if self.label_noise and self.label_flip_rate:
            raise ValueError(
                "set conformal.label_flip_rate (the flip rate f) or conformal.label_noise (the model's ε = f·K/(K-1)), "
                "not both"
            )
        if self.label_flip_rate and self.mondrian == "class":
            raise ValueError(
                "label_flip_rate cannot be combined with mondrian=class; use mondrian=none or group"
            )
        return self


class SelectiveConfig(_Strict):
    """The certified abstention rule: error on answered images ≤ target_risk w.p. ≥ 1-δ (``selective.*``)."""

    method: Literal["bonferroni", "ltt", "sgr"] = Field(
        "ltt", description="threshold search: Learn-then-Test, SGR, or a union bound on a fixed grid"
    )
    target_risk: float = Field(0.02, gt=0, lt=1, description="error rate allowed on answered images")
    delta: float = Field(0.05, gt=0, lt=1, description="the certificate holds with probability ≥ 1-δ")
    group_by: str | None = Field(
        None, description="slice column (e.g. weather): one certificate per value with ≥ min_group_count rows"
    )
    min_group_count: int = Field(
        100, ge=10, description="calibration rows a slice value needs for its own certificate (else global)"
    )


class PolicyConfig(_Strict):
    """Binary tasks: an operating point and miss-rate (false-negative) control (``policy.*``)."""

    operating_point: Literal["none", "max_mcc", "precision", "recall"] = Field(
        "none",
        description="binary tasks: decide positive at this calibration-split operating point (label, and score "
        "remapped so it is 0.5); abstention is certified for that decision",
    )
    positive_class: str | None = Field(
        None,
        description="binary tasks: the class whose probability is the score; null: 'roadwork' for the "
        "roadwork/no_roadwork task, else the alphabetically second class",
    )

    @field_validator("positive_class", mode="before")
    @classmethod
    def _class_name(cls, v: Any) -> Any:
        """Class names are folder names or manifest labels, strings: ``policy.positive_class=1`` means class "1"."""
        return str(v) if isinstance(v, int | float) and not isinstance(v, bool) else v

    target: float = Field(0.9, gt=0, lt=1, description="target precision or recall for operating_point")
    max_miss_rate: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="binary tasks: flag images so E[missed positives] <= this (risk control)",
    )
    group_by: str | None = Field(
        None, description="slice column: miss-rate control per value with ≥ min_group_count positives"
    )
    min_group_count: int = Field(
        50, ge=10, description="positive calibration images a slice value needs for its own threshold"
    )


class EvaluateConfig(_Strict):
    """The test-split evaluation and its report (``evaluate.*``)."""

    ece_bins: int = Field(15, ge=2)
    n_examples: int = Field(16, ge=0, description="images in the sample and worst-mistake grids")
    label_audit: bool = Field(
        True,
        description="audit the calibration and test labels (cleanlab confident learning): label_issues.csv, "
        "label_audit.json and a report section with the top suspects; skipped with a note without cleanlab",
    )
    audit_top: int = Field(12, ge=0, description="label_audit: suspects shown with a thumbnail in the report")


class ExportConfig(_Strict):
    """The deployable bundle: ONNX export, parity check, int8/OpenVINO variants, Triton (``export.*``)."""

    opset: int = Field(18, ge=18)
    exporter: Literal["dynamo", "legacy"] = Field(
        "dynamo",
        description="torch.export-based exporter (falls back to legacy when it fails), or the TorchScript one "
        "(its ViT graphs run ~20% faster in ONNX Runtime on CPU today)",
    )
    parity_atol: float = Field(1e-4, gt=0, description="max |logit difference| torch vs ONNX")
    parity_samples: int = Field(64, ge=1)
    int8: Literal["none", "static"] = Field(
        "none",
        description="also put an int8 ONNX model in the bundle: static (QDQ calibrated on train images); dynamic "
        "is refused (its outputs depend on the batch)",
    )
    int8_calibration_images: int = Field(128, ge=1, description="training images that calibrate static int8")
    openvino: bool = Field(
        False,
        description="also certify OpenVINO variants of model.onnx (fp32; bf16 where the CPU has AVX-512 BF16 or "
        "AMX), each with its own policy, so roadwork bench can select them (needs the openvino extra)",
    )
    max_accuracy_drop: float = Field(
        0.5,
        ge=0,
        description="roadwork bench selects the fastest certified variant whose test accuracy is at most this "
        "many points below fp32's",
    )
    max_ece_increase: float = Field(
        0.01, ge=0, description="... and whose test ECE is at most this much above fp32's"
    )
    triton: bool = Field(False, description="also write a Triton model repository (export/triton/)")
    tensorrt: bool = Field(False, description="check TensorRT through ONNX Runtime (needs an NVIDIA GPU)")

    @field_validator("int8", mode="before")
    @classmethod
    def _batch_invariant(cls, v: object) -> object:
        """A served variant's answer for an image must not depend on its batch-mates: dynamic int8's does."""
        if v == "dynamic":
            raise ValueError(
                "export.int8=dynamic is refused: ONNX Runtime's dynamic quantisation scales activations over the "
                "whole batch, so an image's logits depend on its batch-mates (up to 0.33 on the demo, 11-14 "
                "abstain flags flipped between batch 1 and 256) and no policy certified at one batch size holds "
                "at another. Use export.int8=static (fixed scales calibrated on training images)"
            )
        return v


class CascadeNetConfig(_Strict):
    """The small network of a cascade, trained by the same loop as the main model (``train.*`` settings)."""

    backbone: str = Field("resnet10t", description="timm model name")
    kwargs: dict[str, Any] = Field(
        default_factory=lambda: {"channels": [16, 24, 32, 48], "stem_width": 8},
        description="extra timm.create_model arguments",
    )
    image_size: int = Field(48, ge=16, le=1024, description="network input side in pixels")
    epochs: int | None = Field(None, ge=1, description="null: train.epochs")
    gatekeeper_epochs: int = Field(
        0, ge=0, description="then fine-tune this many epochs with the Gatekeeper loss (0: off)"
    )
    gatekeeper_alpha: float = Field(0.5, gt=0, le=1, description="α of the Gatekeeper loss")
    deferral: Literal["confidence", "learned"] = Field(
        "confidence",
        description="confidence: exit on calibrated confidence; learned: a gate trained jointly with this "
        "network on the cascade objective (LCRON-style)",
    )
    deferral_cost: float = Field(0.1, ge=0, description="learned deferral: the price of sending an image on")


class CascadeConfig(_Strict):
    """boosting → small network → the model: cheap stages answer what they are sure of."""

    enabled: bool | Literal["auto"] = Field(
        False,
        description="build a cascade in front of the model and ship it in the bundle; auto: only where the "
        "calibration split can certify its gate (decided from the data size, said in the log)",
    )
    boosting: Literal["none", "sklearn", "xgboost", "lightgbm", "catboost"] = Field(
        "sklearn", description="gradient-boosting framework of the first stage (cheap image features)"
    )
    boosting_rounds: int = Field(200, ge=1, description="boosting iterations")
    boosting_depth: int = Field(6, ge=1, le=12, description="maximum tree depth")
    small: CascadeNetConfig | None = Field(
        CascadeNetConfig(), description="the small network stage; null for boosting → model"
    )
    mode: Literal["match", "risk"] = Field(
        "match",
        description="match: P(cascade wrong and model right) ≤ target; risk: P(cascade wrong) ≤ target",
    )
    target: float = Field(0.005, gt=0, lt=1, description="the certified bound (see mode)")
    select_stages: bool = Field(
        True, description="keep the subset of earlier stages that is cheapest (each certified at δ/m)"
    )
    delta: float = Field(0.05, gt=0, lt=1, description="the bound holds with probability ≥ 1-δ")
    gate_fraction: float = Field(
        0.5,
        gt=0,
        lt=1,
        description="share of the calibration rows (after the calibrator's) that certify the gate; the rest "
        "certify the policy's thresholds on the cascade's outputs (disjoint rows: see docs, concepts)",
    )
    cost_batch: int = Field(32, ge=1, description="batch size at which each stage's ms/image is measured")
    cost_images: int = Field(256, ge=8, description="test images used to measure costs")

    @field_validator("enabled", mode="before")
    @classmethod
    def _true_false_or_auto(cls, v: Any) -> Any:
        """One message for every other value (pydantic's would list the union's parts)."""
        if isinstance(v, bool) or v == "auto":
            return v
        if isinstance(v, str) and v.strip().lower() in ("true", "false"):
            return v.strip().lower() == "true"
        raise ValueError(
            f"must be true, false or auto (got {v!r}); auto builds a cascade only where it can pay"
        )

    @model_validator(mode="after")
    def _needs_an_earlier_stage(self) -> CascadeConfig:
        """A cascade is earlier stages in front of the model (refused by the cascade_models stage, after training)."""
        if self.enabled and self.boosting == "none" and self.small is None:
            raise ValueError(
                "cascade.enabled=true with cascade.boosting=none and cascade.small=null has no earlier stage; set "
                "cascade.boosting (e.g. sklearn) or cascade.small, or cascade.enabled=false"
            )
        return self

    @model_validator(mode="after")
    def _one_deferral_method(self) -> CascadeConfig:
        """A learned gate and Gatekeeper fine-tuning are two ways to teach the small net when to defer; the
        cascade_models stage would refuse the pair after the main model has trained."""
        s = self.small
        if self.enabled and s is not None and s.deferral == "learned" and s.gatekeeper_epochs:
            raise ValueError(
                f"cascade.small.deferral=learned trains its own gate; it does not combine with "
                f"cascade.small.gatekeeper_epochs={s.gatekeeper_epochs}. Set cascade.small.gatekeeper_epochs=0 "
                "or cascade.small.deferral=confidence"
            )
        return self


class TrackingConfig(_Strict):
    """MLflow (and optionally Weights & Biases) tracking and model registration (``tracking.*``)."""

    enabled: bool = True
    uri: str | None = Field(None, description="MLflow tracking URI; default sqlite:///<root>/mlflow.db")
    experiment: str = "roadwork"
    wandb: bool = Field(
        False,
        description="also log to Weights & Biases (needs wandb; WANDB_MODE=offline works without a login)",
    )
    register_as: str | None = Field(
        None, description="also log the bundle as an MLflow model and register it under this name"
    )

    @model_validator(mode="after")
    def _registry_and_wandb_need_tracking(self) -> TrackingConfig:
        """Registering the bundle and logging to W&B go through the run's tracker: with tracking off they were
        skipped without a word."""
        needs = [
            f"tracking.{k}={v}" for k, v in (("register_as", self.register_as), ("wandb", self.wandb)) if v
        ]
        if not self.enabled and needs:
            raise ValueError(
                f"{' and '.join(needs)} need the run's MLflow tracking, but tracking.enabled=false; set "
                "tracking.enabled=true, or unset them"
            )
        return self


class RunConfig(_Strict):
    """One run: every stage's section, the run folder (ROOT/NAME), and the cross-field rules that depend only
    on the config (checked by :func:`load_config`, before any work)."""

    name: str = Field("default", description="run folder name under root")
    root: str = Field("runs", description="folder holding every run")
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    calibrate: CalibrateConfig = CalibrateConfig()
    conformal: ConformalConfig = ConformalConfig()
    selective: SelectiveConfig = SelectiveConfig()
    policy: PolicyConfig = PolicyConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    cascade: CascadeConfig = CascadeConfig()
    export: ExportConfig = ExportConfig()
    tracking: TrackingConfig = TrackingConfig()

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        if not v or any(c in v for c in "/\\") or v.startswith("."):
            raise ValueError("must be a plain folder name (no slashes, not starting with '.')")
        if len(v.encode()) > 100:  # stage folders and temp names are appended: stay well under NAME_MAX (255)
            raise ValueError(f"is {len(v.encode())} bytes long; use a folder name of at most 100 bytes")
        return v

    @model_validator(mode="after")
    def _mixing_needs_hard_label_loss(self) -> RunConfig:
        """MixUp/CutMix make soft labels, which the Gatekeeper loss cannot take (the loop would refuse them only
        once training starts)."""
        t = self.train
        if (t.mixup or t.cutmix) and t.loss != "ce":
            raise ValueError(
                f"train.mixup={t.mixup:g} / train.cutmix={t.cutmix:g} mix labels, which train.loss={t.loss!r} "
                "cannot take; set train.mixup=0 train.cutmix=0, or train.loss=ce"
            )
        return self

    @model_validator(mode="after")
    def _fsdp_without_ema_or_compile(self) -> RunConfig:
        """FSDP2 sharding does not support an EMA copy or torch.compile yet (refused when training starts)."""
        t = self.train
        if t.strategy == "fsdp" and t.devices > 1 and (t.ema is not None or t.compile):
            raise ValueError(
                f"train.strategy=fsdp does not support train.ema={t.ema} or train.compile={t.compile} yet; "
                "set train.ema=null train.compile=false, or use train.strategy=ddp"
            )
        return self

    @model_validator(mode="after")
    def _explora_needs_unlabeled(self) -> RunConfig:
        """ExPLoRA pre-trains on unlabelled images: without a folder the train stage would fail after the data
        stage (whether the folder exists is checked there)."""
        if self.train.recipe == "explora" and not self.train.unlabeled:
            raise ValueError(
                "train.recipe=explora needs train.unlabeled=FOLDER of unlabelled target-domain images (got "
                "null); set it, or train.recipe=supervised"
            )
        return self

    @model_validator(mode="after")
    def _small_net_takes_hard_labels(self) -> RunConfig:
        """The cascade's small net trains with ``train.*``; a learned gate or Gatekeeper fine-tuning cannot
        take MixUp/CutMix's soft labels, which the cascade_models stage would find only after the main model
        has trained."""
        c, t = self.cascade, self.train
        learned = c.small is not None and c.small.deferral == "learned"
        gatekeeper = c.small is not None and c.small.gatekeeper_epochs > 0
        if c.enabled and (learned or gatekeeper) and (t.mixup or t.cutmix):
            what = "cascade.small.deferral=learned" if learned else "cascade.small.gatekeeper_epochs>0"
            raise ValueError(
                f"{what} trains the cascade's small net on hard labels, but train.mixup={t.mixup:g} / "
                f"train.cutmix={t.cutmix:g} (which it shares with the model) mix them; set train.mixup=0 "
                "train.cutmix=0, or cascade.small.deferral=confidence with cascade.small.gatekeeper_epochs=0"
            )
        return self

    @property
    def run_dir(self) -> Path:
        """The run's folder, ROOT/NAME."""
        return Path(self.root) / self.name


# ---------------------------------------------------------------------------------------------
# Loading, overrides and error messages


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)")


def preset_names() -> list[str]:
    """The built-in presets (``default``, ``demo``, ...), usable wherever a CONFIG file is."""
    return sorted(
        p.name[:-5] for p in resources.files("roadwork.configs").iterdir() if p.name.endswith(".yaml")
    )


def _all_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys.extend(_all_keys(ann, f"{prefix}{name}."))
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _suggest(key: str) -> str:
    from typing import get_args

    def leaves(model: type[BaseModel], prefix: str = "") -> list[str]:
        # like _all_keys, but into optional sections too (cascade.small: CascadeNetConfig | None)
        out = []
        for name, field in model.model_fields.items():
            inner = [a for a in (field.annotation, *get_args(field.annotation)) if isinstance(a, type)]
            sub = next((a for a in inner if issubclass(a, BaseModel)), None)
            out.extend([f"{prefix}{name}", *leaves(sub, f"{prefix}{name}.")] if sub else [f"{prefix}{name}"])
        return out

    keys = leaves(RunConfig)
    section, _, leaf = key.rpartition(".")
    siblings = [k.rpartition(".")[2] for k in keys if k.rpartition(".")[0] == section]
    near = difflib.get_close_matches(leaf, siblings, n=1, cutoff=0.6) if section and siblings else []
    # the section is right and only the last part misspelt: 'cascade.small.deferal' → 'cascade.small.deferral'
    if near:
        return f" Did you mean '{section}.{near[0]}'?"
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    if not close:  # match on the last component too: 'epoch' → 'train.epochs'
        leaf = key.rsplit(".", 1)[-1]
        by_leaf = {k.rsplit(".", 1)[-1]: k for k in keys}
        close = [by_leaf[m] for m in difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.6)]
    return f" Did you mean '{close[0]}'?" if close else " Run 'roadwork config show' to list every key."


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """Turn ``["train.epochs=3", "data.source=imgs/"]`` into a nested dict with typed values."""
    nested: dict[str, Any] = {}
    for arg in args:
        if "=" not in arg:
            raise ConfigError(f"Override {arg!r} is not of the form key=value (for example train.epochs=3).")
        key, raw = arg.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"Override {arg!r} has an empty key; write key=value, e.g. train.epochs=3.")
        try:
            value = yaml_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw  # not valid YAML: keep the string, the model decides whether that is allowed
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads '1e-3' as a string; users mean a number
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(
                    f"Override {arg!r} sets a key below {part!r}, which is a value, not a section."
                )
        node[parts[-1]] = value
    return nested


def merge_values(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` merged in, section by section (nested dicts merge; other values replace)."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge_values(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


_merge = merge_values  # the old private name, still imported by roadwork.scale.sweep


class _NoAliasLoader(yaml.SafeLoader):
    """PyYAML's safe loader without aliases: a config needs none, and a 1 KB alias bomb ("billion laughs") expands
    to gigabytes once the values are copied (1.5 GB in 25 s for roadwork config show)."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            anchor = self.peek_event().anchor
            raise yaml.YAMLError(
                f"YAML aliases (*{anchor}) are not accepted in a roadwork config: write the values out"
            )
        return super().compose_node(parent, index)


def yaml_load(text: str) -> Any:
    """YAML for configs and overrides: ``yaml.safe_load`` without aliases (see :class:`_NoAliasLoader`)."""
    return yaml.load(text, Loader=_NoAliasLoader)  # a SafeLoader subclass: no arbitrary objects either


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"Config file {str(path)!r} is not valid YAML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"Config file {str(path)!r} is not UTF-8 text ({e.reason} at byte {e.start})."
        ) from None
    except RecursionError:
        raise ConfigError(f"Config file {str(path)!r} is nested too deeply to be a config.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"Config file {str(path)!r} must hold a mapping of keys, got {type(data).__name__}."
        )
    return data


def _resolve_source(config: str | Path | None) -> dict[str, Any]:
    if config is None:
        return {}
    path = Path(config)
    if path.is_file():
        return _read_yaml(path)
    name = str(config)
    if name in preset_names():
        return _read_yaml(Path(str(resources.files("roadwork.configs").joinpath(f"{name}.yaml"))))
    raise ConfigError(
        f"Config {name!r} is neither a YAML file nor a preset. Pass a path to a .yaml file or one of the "
        f"presets: {', '.join(preset_names())}."
    )


def _explain(err: ValidationError, values: dict[str, Any]) -> ConfigError:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"Unknown config key '{key}'.{_suggest(key)}")
            continue
        if e["type"] == "value_error" and isinstance(
            e.get("input"), dict
        ):  # a model validator: its message names the fields, values and fix
            lines.append(
                f"Invalid config{f' ({key})' if key else ''}: {e['msg'].removeprefix('Value error, ')}."
            )
            continue
        got = e.get("input")
        allowed = e["msg"]
        ctx = e.get("ctx") or {}
        if "expected" in ctx:
            allowed = f"one of {ctx['expected']}"
        where = f"'{key}'" if key else "the config"
        lines.append(f"Invalid value for {where}: got {got!r}; {allowed}.")
    return ConfigError("\n".join(lines))


def load_config(
    config: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None
) -> RunConfig:
    """Resolve defaults ← ``config`` (YAML path or preset name) ← ``overrides`` into a validated RunConfig.

    >>> load_config("demo", ["train.epochs=2"]).train.epochs
    2
    """
    values = _resolve_source(config)
    if overrides:
        extra = parse_overrides(overrides) if isinstance(overrides, list) else overrides
        values = merge_values(values, extra)
    try:
        return RunConfig.model_validate(values)
    except ValidationError as e:
        raise _explain(e, values) from None


def dump_config(cfg: RunConfig) -> str:
    """The resolved configuration as YAML (what ``roadwork config show`` prints; it loads back unchanged)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
