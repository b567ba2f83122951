"""DoRAN's stabilised weight decomposition on top of peft's DoRA (``train.finetune=doran``).

DoRA (Liu et al., 2024) writes an adapted linear weight as ``W' = m (W + sBA) / ||W + sBA||_c`` with a learned
magnitude ``m`` per output and the column norm treated as a constant in the backward pass. DoRAN (Diep et al.,
2025, arXiv 2510.04331) has two parts:

1. **Noise in the denominator** — implemented here: ``W' = m (W + sBA) / (||W + sBA||_c + τ)`` with one learnable
   ``τ > 0`` per adapted layer (``τ = softplus(ρ)``, so it stays positive; it receives gradient, the norm still
   does not). The denominator can no longer collapse, which is the paper's stabilisation argument. ``m`` starts at
   ``||W||_c + τ₀`` so that the adapted model equals the base model at initialisation, as DoRA's does.
2. **Auxiliary networks** that generate the low-rank matrices and share them between the query and value
   projections of a block — *not* implemented: timm ViTs fuse q, k and v into one ``qkv`` linear, so the
   coupling would need a different adapter layout; the adapters stay peft's static ``A``/``B``.

The offset applies to every layer DoRA adapts: linear layers (ViT ``qkv``, ``Linear`` in ConvNeXt's MLPs) and the
1x1 ``Conv2d`` layers a ResNet or EfficientNet gets adapters on (the column norm is then the norm of each output
channel's kernel, as in peft's DoRA for convolutions). Other DoRA layers (embeddings, Conv1d/3d) are refused
with a :class:`~roadwork.errors.ConfigError`.

Merging (``merge_adapters``) folds ``m / (||W + sBA||_c + τ)`` into the weights through peft's DoRA merge, which
calls ``get_weight_norm`` of the layer (norm plus ``τ``); the merged model gives the adapted logits (tested to 1e-5).
"""

from __future__ import annotations

import math
from typing import Any

from roadwork._deps import require
from roadwork.errors import ConfigError

__all__ = ["TAU_INIT", "enable_doran"]

TAU_INIT = 1e-3
"""The initial value of DoRAN's learnable offset in the weight norm."""


def _layer_class() -> Any:
    torch = require("torch")
    from peft.tuners.lora.dora import DoraLinearLayer
    from peft.utils.other import transpose

    F = torch.nn.functional

    class DoranLinearLayer(DoraLinearLayer):
        """peft's DoRA layer with a learnable positive offset ``τ`` in the column-norm denominator."""

        def __init__(self, fan_in_fan_out: bool, weight: Any, tau: float) -> None:
            super().__init__(fan_in_fan_out)
            self.weight = torch.nn.Parameter(weight.detach().clone() + tau)
            rho = math.log(math.expm1(tau))  # softplus^-1(tau)
            self.tau_raw = torch.nn.Parameter(torch.tensor(rho, dtype=weight.dtype, device=weight.device))

        def tau(self) -> Any:
            return F.softplus(self.tau_raw)

        def _norm(self, weight: Any, lora_weight: Any, scaling: float) -> Any:
            w = transpose(weight, self.fan_in_fan_out) + scaling * lora_weight
            return torch.linalg.norm(w, dim=1).to(w.dtype)

        def get_weight_norm(
            self, weight: Any, lora_weight: Any, scaling: float, adapter_name: Any = None
        ) -> Any:
            """What peft's merge divides by: the column norm plus ``τ``."""
            return self._norm(weight, lora_weight, scaling) + self.tau()

        def forward(
            self,
            x: Any,
            *,
            lora_A: Any,
            lora_B: Any,
            scaling: float,
            base_layer: Any,
            base_result: Any = None,
            adapter_name: str = "default",
        ) -> Any:
            lora_weight = self.get_lora_weight(lora_A=lora_A, lora_B=lora_B, adapter_name=adapter_name).to(
                x.dtype
            )
            weight = base_layer.weight.to(x.dtype)
            denom = self._norm(weight, lora_weight.detach(), scaling).detach() + self.tau()
            mag_norm_scale = (self.weight / denom).view(1, -1)
            lora_result = lora_B(lora_A(x))
            if base_result is not None:
                if base_layer.bias is not None:
                    base_result = base_result - base_layer.bias
            else:
                base_result = F.linear(x, transpose(weight, self.fan_in_fan_out))
            return (mag_norm_scale - 1) * base_result + mag_norm_scale * lora_result * scaling

        def __repr__(self) -> str:
            return "lora.doran." + super(DoraLinearLayer, self).__repr__()

    return DoranLinearLayer


def _conv2d_class() -> Any:
    torch = require("torch")
    from peft.tuners.lora.dora import DoraConv2dLayer

    F = torch.nn.functional

    class DoranConv2dLayer(DoraConv2dLayer):
        """peft's DoRA layer for ``Conv2d`` with DoRAN's learnable offset ``τ``; norms are per output channel."""

        def __init__(self, fan_in_fan_out: bool, weight: Any, tau: float) -> None:
            super().__init__(fan_in_fan_out)
            self.weight = torch.nn.Parameter(weight.detach().clone() + tau)  # (1, out, 1, 1)
            rho = math.log(math.expm1(tau))
            self.tau_raw = torch.nn.Parameter(torch.tensor(rho, dtype=weight.dtype, device=weight.device))

        def tau(self) -> Any:
            return F.softplus(self.tau_raw)

        def _norm(self, weight: Any, lora_weight: Any, scaling: float) -> Any:
            w = weight + scaling * lora_weight  # (out, in, kh, kw)
            return w.norm(p=2, dim=tuple(range(1, w.dim())), keepdim=True).transpose(1, 0)

        def get_weight_norm(
            self, weight: Any, lora_weight: Any, scaling: float, adapter_name: Any = None
        ) -> Any:
            return self._norm(weight, lora_weight, scaling) + self.tau()

        def forward(
            self,
            x: Any,
            *,
            lora_A: Any,
            lora_B: Any,
            scaling: float,
            base_layer: Any,
            base_result: Any = None,
            adapter_name: str = "default",
        ) -> Any:
            weight = base_layer.weight
            lora_weight = self.get_lora_weight(lora_A=lora_A, lora_B=lora_B, adapter_name=adapter_name)
            lora_weight = lora_weight.reshape(weight.shape)
            denom = self._norm(weight, lora_weight.detach(), scaling).detach() + self.tau()
            mag_norm_scale = self.weight / denom
            if base_result is None:
                base_result = self.conv_fn(
                    x,
                    weight,
                    bias=None,
                    stride=base_layer.stride,
                    padding=base_layer.padding,
                    dilation=base_layer.dilation,
                    groups=base_layer.groups,
                )
            elif base_layer.bias is not None:
                base_result = base_result - base_layer.bias.view(1, -1, *([1] * (base_result.dim() - 2)))
            return (mag_norm_scale - 1) * base_result + mag_norm_scale * lora_B(lora_A(x)) * scaling

        def __repr__(self) -> str:
            return "lora.doran." + super(DoraConv2dLayer, self).__repr__()

    return DoranConv2dLayer


def enable_doran(peft_model: Any, tau: float = TAU_INIT) -> int:
    """Swap every DoRA layer of a peft model (made with ``use_dora=True``) for DoRAN's; returns how many."""
    from peft.tuners.lora.dora import DoraConv2dLayer, DoraLinearLayer

    linear, conv2d = _layer_class(), _conv2d_class()
    n = 0
    for module_name, module in peft_model.named_modules():
        mags = getattr(module, "lora_magnitude_vector", None)
        if mags is None:
            continue
        for name in list(mags.keys()):
            old = mags[name]
            if isinstance(old, DoraConv2dLayer):
                cls = conv2d
            elif type(old) is DoraLinearLayer:
                cls = linear
            else:
                raise ConfigError(
                    f"train.finetune=doran cannot adapt {module_name!r} ({type(old).__name__}): DoRAN covers Linear "
                    "and Conv2d layers. Use train.finetune=dora, or pass target_modules without it."
                )
            mags[name] = cls(old.fan_in_fan_out, old.weight, tau)
            n += 1
    return n
