"""train.augment presets and mixup/cutmix: what each does to a batch, determinism under the seed, old configs."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")

from roadwork.config import TrainConfig, load_config  # noqa: E402
from roadwork.data.preprocess import PreprocessSpec  # noqa: E402
from roadwork.errors import ConfigError  # noqa: E402
from roadwork.training.augment import BatchAugment, light_augment  # noqa: E402
from roadwork.training.augment import to_input as _to_input  # noqa: E402

SPEC = PreprocessSpec(size=32)


def _batch(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    u8 = torch.randint(0, 256, (n, 32, 32, 3), generator=g, dtype=torch.uint8)
    u8[:, :, :16] = 20  # structure, so crops and flips change pixels
    return u8, torch.arange(n) % 2


def test_old_boolean_configs_still_load() -> None:
    assert TrainConfig(augment=True).augment == "light"
    assert TrainConfig(augment=False).augment == "none"
    assert TrainConfig().augment == "light"
    assert load_config(None, ["train.augment=false"]).train.augment == "none"
    assert load_config(None, ["train.augment=strong", "train.mixup=0.2"]).train.mixup == 0.2
    with pytest.raises(ConfigError, match=r"train.augment.*'heavy'.*'none', 'light', 'standard' or 'strong'"):
        load_config(None, ["train.augment=heavy"])


def test_none_is_the_plain_input_and_light_is_the_original_augmentation() -> None:
    u8, y = _batch()
    x, y2 = BatchAugment("none", SPEC, num_classes=2, seed=0)(u8, y, epoch=0, step=0)
    assert torch.equal(x, _to_input(torch, u8, SPEC)) and torch.equal(y2, y)
    gen_a, gen_b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    x, _ = BatchAugment("light", SPEC, num_classes=2, seed=0)(u8, y, epoch=0, step=0, gen=gen_a)
    assert torch.equal(x, light_augment(torch, _to_input(torch, u8, SPEC), gen_b))


def test_light_runs_on_the_device_the_batch_is_on() -> None:
    """The loop moves uint8 batches to the device before ``light``: its CPU-generator draws must follow them
    there (a GPU augments there). The meta device stands in for CUDA: any other device than the draws' CPU."""
    x = torch.zeros(4, 3, 16, 16, device="meta")
    out = light_augment(torch, x, torch.Generator().manual_seed(0))
    assert out.device.type == "meta" and out.shape == x.shape


@pytest.mark.parametrize("preset", ["standard", "strong"])
def test_presets_change_images_and_repeat_under_the_seed(preset: str) -> None:
    u8, y = _batch()
    aug = BatchAugment(preset, SPEC, num_classes=2, seed=3)
    before = torch.get_rng_state()
    x1, _ = aug(u8, y, epoch=1, step=2)
    assert torch.equal(torch.get_rng_state(), before)  # torch's global RNG is left as it was
    x2, _ = aug(u8, y, epoch=1, step=2)
    x_next, _ = aug(u8, y, epoch=1, step=3)
    x_seed, _ = BatchAugment(preset, SPEC, num_classes=2, seed=4)(u8, y, epoch=1, step=2)
    plain = _to_input(torch, u8, SPEC)
    assert x1.shape == plain.shape == (8, 3, 32, 32) and x1.dtype == torch.float32
    assert torch.equal(x1, x2)
    assert not torch.equal(x1, x_next) and not torch.equal(x1, x_seed)
    changed = (x1 - plain).abs().flatten(1).mean(1) > 1e-3
    assert changed.float().mean() >= 0.75  # most images differ from the input
    assert (
        len({tuple(r.tolist()) for r in (x1 - plain).abs().flatten(1).mean(1, keepdim=True)}) > 1
    )  # per image


@pytest.mark.parametrize(("mixup", "cutmix"), [(0.4, 0.0), (0.0, 1.0), (0.4, 1.0)])
def test_mixing_gives_soft_labels_that_sum_to_one(mixup: float, cutmix: float) -> None:
    u8, y = _batch()
    aug = BatchAugment("none", SPEC, num_classes=3, seed=0, mixup=mixup, cutmix=cutmix)
    assert aug.soft_labels
    x, soft = aug(u8, y, epoch=0, step=0)
    assert soft.shape == (8, 3) and soft.dtype == torch.float32
    torch.testing.assert_close(soft.sum(1), torch.ones(8))
    assert soft[:, 2].abs().max() == 0  # class 2 is in no image, so in no mixture
    assert ((soft > 0) & (soft < 1)).any()  # mixed, not one-hot
    x2, soft2 = aug(u8, y, epoch=0, step=0)
    assert torch.equal(x, x2) and torch.equal(soft, soft2)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], np.ndarray]:
    d = tmp_path_factory.mktemp("aug")
    rng = np.random.default_rng(0)
    paths, labels = [], []
    for i in range(32):
        label = i % 2
        Image.fromarray((rng.integers(0, 120, (32, 32, 3)) + 120 * label).astype(np.uint8)).save(
            d / f"{i}.png"
        )
        paths.append(str(d / f"{i}.png"))
        labels.append(label)
    return paths, np.array(labels)


def _fit(images: tuple[list[str], np.ndarray], **kw: object) -> list[dict[str, float]]:
    from roadwork.config import ModelConfig
    from roadwork.training.loop import train_model

    paths, labels = images
    model = ModelConfig(backbone="test_vit", image_size=32, drop_rate=0.0, kwargs={"img_size": 32})
    cfg = TrainConfig(**({"epochs": 2, "batch_size": 16, "accelerator": "cpu", "patience": 5} | kw))  # type: ignore[arg-type]
    res = train_model(
        model,
        cfg,
        classes=["a", "b"],
        train_paths=paths,
        train_labels=labels,
        val_paths=paths[:8],
        val_labels=labels[:8],
        progress=False,
    )
    return res.history


def test_training_with_standard_and_mixup_is_deterministic(images: tuple[list[str], np.ndarray]) -> None:
    pytest.importorskip("lightning_fabric")
    a = _fit(images, augment="standard", mixup=0.2, cutmix=1.0, epochs=1)
    b = _fit(images, augment="standard", mixup=0.2, cutmix=1.0, epochs=1)
    c = _fit(images, augment="none", epochs=1)
    assert [r["train_loss"] for r in a] == [r["train_loss"] for r in b]
    assert all(np.isfinite(r["train_loss"]) for r in a)
    assert [r["train_loss"] for r in a] != [r["train_loss"] for r in c]


def test_mixing_refuses_losses_that_need_hard_labels(images: tuple[list[str], np.ndarray]) -> None:
    pytest.importorskip("lightning_fabric")
    with pytest.raises(ConfigError, match="train.mixup=0 train.cutmix=0"):
        _fit(images, mixup=0.2, loss="gatekeeper", epochs=1)
