"""Training augmentation: ``train.augment=none|light|standard|strong`` and ``train.mixup`` / ``train.cutmix``.

- ``light``: the original hand-written batch augmentation (flip, a <= 6 % shift with reflection, brightness and
  contrast jitter) on normalised tensors, batched, on the training device (a GPU's when there is one: the loop
  moves the uint8 batch there first). ``train.augment=true`` in old configs means this.
- ``standard``: torchvision.transforms.v2 per image (on the CPU, in the DataLoader workers), the field's
  fine-tuning default (timm/DeiT-style): RandomResizedCrop(scale 0.35-1), horizontal flip, TrivialAugmentWide,
  ColorJitter 0.2; RandomErasing p=0.25.
- ``strong``: RandomResizedCrop(scale 0.08-1), flip, RandAugment(2 ops, magnitude 9), ColorJitter 0.4;
  RandomErasing p=0.25. For long schedules from scratch or heavy fine-tuning.
- ``mixup`` / ``cutmix``: Beta(α, α) mixing of image pairs in a batch (torchvision's MixUp / CutMix; one of the
  two per batch when both are set); labels become soft (probabilities), so the loss is cross-entropy on them.

Deterministic under ``train.seed``: the torchvision presets and mixing draw from torch's RNG reseeded per batch
with (seed, epoch, step) inside ``fork_rng``, independent of anything else the process does with it — so a resumed
run augments the same images the same way. ``light`` draws from the loop's own seeded generator, as before.
"""

from __future__ import annotations

from typing import Any, Literal

from roadwork.data.preprocess import PreprocessSpec

__all__ = ["AUGMENT_PRESETS", "BatchAugment", "light_augment", "to_input"]

AugmentPreset = Literal["none", "light", "standard", "strong"]
AUGMENT_PRESETS: tuple[str, ...] = ("none", "light", "standard", "strong")
"""The values of ``train.augment``."""


def to_input(torch: Any, u8: Any, spec: PreprocessSpec) -> Any:
    """(B, H, W, 3) uint8 tensor → normalised (B, 3, H, W) float32, same arithmetic as ``preprocess.to_float``."""
    x = u8.permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(spec.mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def light_augment(torch: Any, x: Any, gen: Any) -> Any:
    """The ``light`` preset on a normalised float batch (B, 3, H, W): flip, small shift, gain and bias. The draws
    come from ``gen`` (a CPU generator) and move to ``x``'s device: on a GPU the arithmetic runs there."""
    b, _, h, w = x.shape
    flip = (torch.rand(b, generator=gen) < 0.5).to(x.device)
    x = torch.where(flip.view(b, 1, 1, 1), x.flip(3), x)
    pad = max(1, h // 16)  # translate by up to ~6% with reflection padding
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad), mode="reflect")
    dx, dy = (int(v) for v in torch.randint(0, 2 * pad + 1, (2,), generator=gen))
    x = xp[:, :, dy : dy + h, dx : dx + w]
    gain = 1.0 + 0.15 * (torch.rand(b, 1, 1, 1, generator=gen) * 2 - 1)
    bias = 0.15 * (torch.rand(b, 1, 1, 1, generator=gen) * 2 - 1)
    return x * gain.to(x.device) + bias.to(x.device)


def _image_pipeline(preset: str, size: int) -> tuple[Any, Any]:
    """(transform on one uint8 (3, H, W) image, RandomErasing on one normalised float image)."""
    from torchvision.transforms import v2

    if preset == "standard":
        scale, policy, jitter = (0.35, 1.0), v2.TrivialAugmentWide(), 0.2
    else:
        scale, policy, jitter = (0.08, 1.0), v2.RandAugment(num_ops=2, magnitude=9), 0.4
    pixels = v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=scale, antialias=True),
            v2.RandomHorizontalFlip(),
            policy,
            v2.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter),
        ]
    )
    return pixels, v2.RandomErasing(p=0.25, value=0)


class BatchAugment:
    """Augment one training batch: uint8 images in, network input (and labels, soft when mixing) out.

    ``__call__(u8, y, epoch=, step=)``: ``u8`` (B, H, W, 3) uint8 tensor, ``y`` (B,) int64 → ``x`` (B, 3, H, W)
    float32 normalised with ``spec`` and ``y`` ((B,) int64, or (B, K) float32 probabilities with mixup/cutmix).
    """

    def __init__(
        self,
        preset: str,
        spec: Any,
        *,
        num_classes: int,
        seed: int,
        mixup: float = 0.0,
        cutmix: float = 0.0,
    ) -> None:
        if preset not in AUGMENT_PRESETS:
            raise ValueError(f"augment preset must be one of {AUGMENT_PRESETS}; got {preset!r}")
        self.preset = preset
        self.spec = spec
        self.num_classes = num_classes
        self.seed = seed
        self.mixup = mixup
        self.cutmix = cutmix
        self._pixels: Any = None
        self._erase: Any = None
        self._mix: Any = None
        if preset in ("standard", "strong"):
            self._pixels, self._erase = _image_pipeline(preset, spec.size)
        if mixup > 0 or cutmix > 0:
            from torchvision.transforms import v2

            mixers = ([v2.MixUp(alpha=mixup, num_classes=num_classes)] if mixup > 0 else []) + (
                [v2.CutMix(alpha=cutmix, num_classes=num_classes)] if cutmix > 0 else []
            )
            self._mix = mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)

    @property
    def soft_labels(self) -> bool:
        return self._mix is not None

    def __call__(self, u8: Any, y: Any, *, epoch: int, step: int, gen: Any = None) -> tuple[Any, Any]:
        """``gen``: the loop's generator, which ``light`` draws from (as it always did: old runs repeat)."""
        import torch

        # one seed per (seed, epoch, step): torchvision draws from torch's global RNG, so fork it
        batch_seed = ((self.seed * 1_000_003 + epoch) * 1_000_003 + step) % (2**63)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(batch_seed)
            if self._pixels is not None:
                chw = u8.permute(0, 3, 1, 2)
                u8 = torch.stack([self._pixels(img) for img in chw]).permute(0, 2, 3, 1)
            x = to_input(torch, u8, self.spec)
            if self.preset == "light":
                x = light_augment(
                    torch, x, gen if gen is not None else torch.Generator().manual_seed(batch_seed)
                )
            elif self._erase is not None:
                x = torch.stack([self._erase(img) for img in x])
            if self._mix is not None:
                x, y = self._mix(x, y)
        return x, y
