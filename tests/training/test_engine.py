"""Training-engine options on a tiny random-weight ViT: EMA, layer-wise LR decay, class balance, checkpointing,
the out-of-memory message."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
pytest.importorskip("lightning_fabric")

from roadwork.config import ModelConfig, TrainConfig  # noqa: E402
from roadwork.training.loop import _layer_groups, train_model  # noqa: E402

MODEL = ModelConfig(backbone="test_vit", image_size=32, drop_rate=0.0, kwargs={"img_size": 32})


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    paths, labels = [], []
    for i in range(48):  # imbalanced: 36 of class 0, 12 of class 1 (brighter)
        label = int(i % 4 == 0)
        img = rng.integers(0, 120, (32, 32, 3)) + 120 * label
        Image.fromarray(img.astype(np.uint8)).save(d / f"{i}.png")
        paths.append(str(d / f"{i}.png"))
        labels.append(label)
    return paths, np.array(labels)


def _train(images, **kw):  # type: ignore[no-untyped-def]
    paths, labels = images
    defaults = dict(epochs=2, batch_size=16, lr=3e-3, accelerator="cpu", augment=False, patience=5)
    cfg = TrainConfig(**(defaults | kw))
    return train_model(
        MODEL,
        cfg,
        classes=["a", "b"],
        train_paths=paths,
        train_labels=labels,
        val_paths=paths[:16],
        val_labels=labels[:16],
        progress=False,
    )


def _initial():  # type: ignore[no-untyped-def]
    from roadwork.models.factory import create_model

    torch.manual_seed(0)
    from lightning_fabric import seed_everything

    seed_everything(0, verbose=False)
    return create_model(MODEL, 2)[0]


def _distance(a, b) -> float:  # type: ignore[no-untyped-def]
    sb = b.state_dict()
    return float(sum(((v.float() - sb[k].float()) ** 2).sum() for k, v in a.state_dict().items()) ** 0.5)


@pytest.mark.parametrize(
    "option",
    [
        {"class_balance": "weights"},
        {"class_balance": "sampler"},
        {"grad_checkpointing": True},
        {"layer_decay": 0.75},
        {"accumulate": 3},
    ],
)
def test_options_train_to_a_finite_loss(images, option):
    res = _train(images, **option)
    assert all(np.isfinite(r["train_loss"]) for r in res.history) and len(res.history) == 2


def test_ema_decay_warms_up_then_holds():
    from roadwork.training.loop import ema_decay

    assert [ema_decay(0.999, t) for t in (0, 1, 10)] == pytest.approx([0.1, 2 / 11, 0.55])
    assert ema_decay(0.999, 10**6) == 0.999 and ema_decay(0.9, 100) == 0.9
    # the share of the starting weights left after 36 steps (3 epochs of 12): 0.998**36 = 93 % without warm-up
    kept = np.prod([ema_decay(0.998, t) for t in range(1, 36)])
    assert kept < 1e-6 < 0.998**36


@pytest.mark.parametrize("decay", [0.99, 0.998])
def test_ema_after_few_steps_is_not_a_copy_of_the_start(images, decay):
    """6 optimiser steps: the kept (EMA) weights move as the raw weights do, head included, and so does the
    validation loss; with a fixed decay they would be 0.99**5 = 95 % (0.998**5 = 99 %) the random start."""
    start = _initial()
    plain, ema = _train(images), _train(images, ema=decay)
    d_plain, d_ema = _distance(plain.model, start), _distance(ema.model, start)
    assert 0.5 * d_plain < d_ema <= 1.5 * d_plain

    def head_change(net):  # type: ignore[no-untyped-def]
        return float((net.get_classifier().weight - start.get_classifier().weight).detach().norm())

    assert head_change(ema.model) > 0.5 * head_change(plain.model) > 0
    moved = [abs(r.history[-1]["val_loss"] - np.log(2)) for r in (plain, ema)]
    assert moved[1] > 0.5 * moved[0] > 0  # the validation loss leaves ln 2 as without EMA


def test_layer_decay_scales_learning_rates_by_depth():
    net = _initial()
    groups = _layer_groups(net, 1.0, 0.5)
    lrs = [g["lr"] for g in groups]
    depth = len({n.split(".")[1] for n, _ in net.named_parameters() if n.startswith("blocks.")})
    assert lrs == sorted(lrs) and lrs[-1] == 1.0 and lrs[0] == pytest.approx(0.5 ** (depth + 1))
    assert sum(len(g["params"]) for g in groups) == len(list(net.parameters()))
    from roadwork.errors import ConfigError

    resnet = __import__("timm").create_model("test_resnet", num_classes=2)
    with pytest.raises(ConfigError, match="layer_decay"):
        _layer_groups(resnet, 1.0, 0.5)


def test_out_of_memory_says_what_to_change(images, monkeypatch):
    from roadwork.errors import RoadworkError

    def boom(self, x):  # type: ignore[no-untyped-def]
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(torch.nn.Module, "__call__", boom, raising=True)
    with pytest.raises(RoadworkError, match=r"train.batch_size=8 train.accumulate=2"):
        _train(images)


@pytest.mark.parametrize("extra", [{}, {"finetune": "lora", "ema": 0.9}])
def test_an_interrupted_run_resumes_to_the_identical_next_epoch(images, tmp_path, extra):
    paths, labels = images
    cfg = TrainConfig(epochs=3, batch_size=16, lr=3e-3, accelerator="cpu", augment=True, patience=5, **extra)

    def run(ckpt, on_epoch=None):  # type: ignore[no-untyped-def]
        return train_model(
            MODEL,
            cfg,
            classes=["a", "b"],
            train_paths=paths,
            train_labels=labels,
            val_paths=paths[:16],
            val_labels=labels[:16],
            progress=False,
            checkpoint_dir=ckpt,
            on_epoch=on_epoch,
        )

    straight = run(tmp_path / "a")

    def stop_after_first(epoch, row):  # type: ignore[no-untyped-def]
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", stop_after_first)
    resumed = run(tmp_path / "b")
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in straight.history]
    assert [r["val_loss"] for r in resumed.history] == [r["val_loss"] for r in straight.history]
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_compiled_training_matches_eager(images):
    """torch.compile (aot_eager here: the same graph capture, no C++ build) trains to the same weights."""
    eager = _train(images).model
    compiled = _train(images, compile=True, compile_backend="aot_eager").model
    a, b = eager.state_dict(), compiled.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)


def test_two_process_ddp_on_cpu_equals_one_process_with_the_doubled_batch(images):
    """DDP over gloo: 2 processes x 8 images per step train like 1 process x 16 (gradients are averaged)."""
    paths, labels = images
    common = dict(epochs=1, lr=3e-3, accelerator="cpu", augment=False, patience=5)

    def run(**kw):  # type: ignore[no-untyped-def]
        cfg = TrainConfig(**common, **kw)
        return train_model(
            MODEL,
            cfg,
            classes=["a", "b"],
            train_paths=paths,
            train_labels=labels,
            val_paths=paths[:16],
            val_labels=labels[:16],
            progress=False,
        )

    seen = []
    ddp = train_model(
        MODEL,
        TrainConfig(**common, devices=2, batch_size=8),
        classes=["a", "b"],
        train_paths=paths,
        train_labels=labels,
        val_paths=paths[:16],
        val_labels=labels[:16],
        progress=False,
        on_epoch=lambda e, row: seen.append(e),
    )
    single = run(batch_size=16)
    a, b = ddp.model.state_dict(), single.model.state_dict()
    assert seen == [1]
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)
    assert ddp.history[0]["val_loss"] == pytest.approx(single.history[0]["val_loss"], abs=1e-4)


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_two_process_fsdp2_on_cpu_equals_one_process_with_the_doubled_batch(images, finetune):
    """FSDP2 (fully_shard per block) over gloo trains like one process with the doubled batch, and the gathered
    model is an ordinary network with the same trainable-parameter count."""
    fsdp = _train(images, epochs=1, finetune=finetune, devices=2, batch_size=8, strategy="fsdp")
    single = _train(images, epochs=1, finetune=finetune, batch_size=16)
    a, b = fsdp.model.state_dict(), single.model.state_dict()
    assert a.keys() == b.keys() and not any("lora" in k for k in a)
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)
    assert fsdp.history[0]["val_loss"] == pytest.approx(single.history[0]["val_loss"], abs=1e-4)
    assert fsdp.trainable_params == single.trainable_params


def test_fsdp2_refuses_what_it_does_not_support_yet(images):
    from roadwork.errors import ConfigError

    for bad in ({"ema": 0.99}, {"compile": True}):
        with pytest.raises(ConfigError, match="train.strategy=fsdp does not support"):
            _train(images, devices=2, strategy="fsdp", **bad)
