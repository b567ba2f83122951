"""Fine-tuning modes on tiny random-weight timm models: they train, count the right parameters, and merge."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
pytest.importorskip("peft")

from roadwork.models.adapters import count_trainable, merge_adapters, prepare_finetune  # noqa: E402


def _vit():  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    return timm.create_model("test_vit", num_classes=2, img_size=32)


def _batch():  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(0)
    return torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 2, (16,), generator=g)


def _expected(mode: str, model) -> int:  # type: ignore[no-untyped-def]
    head = sum(p.numel() for p in model.get_classifier().parameters())
    qkv = [m for n, m in model.named_modules() if n.endswith("attn.qkv")]
    lora = sum(8 * (m.in_features + m.out_features) for m in qkv)
    return {
        "full": sum(p.numel() for p in model.parameters()),
        "linear_probe": head,
        "lora": lora + head,
        "rslora": lora + head,
        "dora": lora + sum(m.out_features for m in qkv) + head,  # + one magnitude per output column
        "doran": lora + sum(m.out_features + 1 for m in qkv) + head,  # + DoRAN's offset per layer
    }[mode]


@pytest.mark.parametrize("mode", ["full", "linear_probe", "lora", "dora", "doran", "rslora"])
def test_every_mode_trains_counts_its_parameters_and_merges(mode):
    base = _vit()
    expected = _expected(mode, base)
    model = prepare_finetune(base, mode, rank=8, alpha=16)
    assert count_trainable(model) == expected
    x, y = _batch()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(25):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.8 * losses[0], losses
    model.eval()
    with torch.no_grad():
        adapted = model(x)
        merged = merge_adapters(model).eval()
        assert type(merged).__name__ == "VisionTransformer"
        assert torch.allclose(merged(x), adapted, atol=1e-5)
    assert not any("lora" in k for k in merged.state_dict())  # a plain timm state dict: save/export unchanged


def test_convnext_gets_adapters_on_its_linear_layers_not_its_head():
    from roadwork.models.adapters import default_targets, head_name

    torch.manual_seed(0)
    net = timm.create_model("test_convnext", num_classes=2)
    targets = default_targets(net)
    assert targets and head_name(net) not in targets and all("head" not in t for t in targets)
    model = prepare_finetune(net, "lora", rank=4)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)  # LoRA starts at zero; perturb so the merge has something to fold in
        before = model(x)
        assert torch.allclose(merge_adapters(model)(x), before, atol=1e-5)


def test_unknown_mode_is_a_config_error():
    from roadwork.errors import ConfigError

    with pytest.raises(ConfigError, match="train.finetune='qlora'"):
        prepare_finetune(_vit(), "qlora")


def test_doran_starts_as_the_base_model_and_learns_its_positive_offset():
    from roadwork.models.doran import TAU_INIT

    base = _vit().eval()
    x, y = _batch()
    with torch.no_grad():
        before = base(x)
    model = prepare_finetune(base, "doran", rank=8, alpha=16)
    taus = [m for n, m in model.named_modules() if type(m).__name__ == "DoranLinearLayer"]
    assert len(taus) == sum(1 for n, _ in base.named_modules() if n.endswith("attn.qkv")) > 0
    with torch.no_grad():
        assert torch.allclose(model(x), before, atol=1e-5)  # m = ||W|| + tau: identity at start
    assert all(abs(float(m.tau()) - TAU_INIT) < 1e-9 for m in taus)
    model.train()
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    assert all(m.tau_raw.grad is not None and float(m.tau_raw.grad.abs()) > 0 for m in taus)
    raw = [float(m.tau_raw) for m in taus]
    torch.optim.SGD([m.tau_raw for m in taus], lr=1e3).step()
    assert all(float(m.tau_raw) != r and float(m.tau()) > 0 for m, r in zip(taus, raw, strict=True))


@pytest.mark.parametrize("arch", ["test_resnet", "test_convnext"])
def test_doran_on_convolutional_networks_trains_and_merges(arch):
    """Conv2d targets get DoRAN's convolution layer (per-channel norms), not a Linear one that crashes in conv2d."""
    torch.manual_seed(0)
    base = timm.create_model(arch, num_classes=2).eval()
    x, y = _batch()
    with torch.no_grad():
        before = base(x)
    model = prepare_finetune(base, "doran", rank=4, alpha=8)
    layers = [m for m in model.modules() if type(m).__name__.startswith("Doran")]
    assert layers
    if arch == "test_resnet":
        assert any(type(m).__name__ == "DoranConv2dLayer" for m in layers)
    with torch.no_grad():
        assert torch.allclose(model(x), before, atol=1e-4)  # identity at the start, as DoRA
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        assert all(m.tau_raw.grad is not None for m in layers)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    with torch.no_grad():
        adapted = model(x)
        assert torch.allclose(merge_adapters(model).eval()(x), adapted, atol=1e-4)


def test_doran_refuses_layers_it_cannot_adapt():
    from roadwork.errors import ConfigError

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(10, 8)
            self.head = torch.nn.Linear(8, 2)

        def get_classifier(self):  # type: ignore[no-untyped-def]
            return self.head

        def forward(self, x):  # type: ignore[no-untyped-def]
            return self.head(self.emb(x).mean(1))

    with pytest.raises(ConfigError, match="doran cannot adapt 'base_model.model.emb'"):
        prepare_finetune(Tiny(), "doran", target_modules=["emb"])
