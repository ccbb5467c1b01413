"""Model configuration as plain, frozen data."""
from __future__ import annotations

import dataclasses
import json
from typing import Any


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything that defines a Res-CR-Net.

    Attributes:
      in_channels: channels of the input image (1 for CXRs, 3 for RGB microscopy).
      num_classes: output classes; for lungs 2 (channel 0 = lung, channel 1 = non-lung).
      num_conv_res: CONV RES blocks after the STEM. Without LSTM blocks the last of them is
        followed by the head and has no dropout (the authors' lung network: 5).
      num_lstm_res: LSTM RES blocks at the end of the network (0 for the lung network).
      filters: output channels of each separable convolution branch (3 branches -> 3*filters).
      kernel_sizes, dilations: the (k, d) of the three parallel branches.
      dropout_rate: SpatialDropout2D rate (whole channels) after the blocks.
      leaky_slope: LeakyReLU negative slope.
      bn_momentum, bn_epsilon: BatchNorm settings (Keras convention: moving = m*moving + (1-m)*batch).
      dtype: compute dtype ("float32" or "bfloat16"); parameters stay in param_dtype.
      param_dtype: parameter dtype.
      depthwise_impl: depthwise convolution implementation ("auto" picks the fastest).
      remat: what a block keeps for the backward pass (training mode only). A residual
        block in training keeps only its input and its branches' first-convolution outputs
        (3 * filters channels) whatever this says but True: its shortcut's backward needs
        nothing else (`crnet_jax.pointwise_bn`) and the branches' second convolutions need
        exactly those. "branches" (default) and False: that. True: only its input; the
        backward recomputes the whole block (`model.recompute_in_backward`). LSTM RES blocks
        treat "branches" as True and False as keeping everything XLA keeps. At 300 x 340 x 8
        on the 2-core CPU (12-02, benchmarks/RESULTS.md "tenth pass"): "branches" 2.04 GiB of
        compiled temporaries (peak RSS 2.7 GiB), True 1.46 GiB (the seventh pass measured
        10-25% more time for True).
      fused_inference: in inference mode, run each residual block (STEM, CONV RES) as one
        C++ kernel (`crnet_jax.fused_block`) when depthwise_impl resolves to "ffi" and dtype is
        float32; the same values as the layer-by-layer kernels up to rounding order.
    """

    in_channels: int = 1
    num_classes: int = 2
    num_conv_res: int = 5
    num_lstm_res: int = 0
    filters: int = 16
    kernel_sizes: tuple[int, ...] = (3, 5, 7)
    dilations: tuple[int, ...] = (1, 3, 5)
    dropout_rate: float = 0.05
    leaky_slope: float = 0.1
    bn_momentum: float = 0.99
    bn_epsilon: float = 1e-3
    dtype: str = "float32"
    param_dtype: str = "float32"
    depthwise_impl: str = "auto"
    remat: bool | str = "branches"
    fused_inference: bool = True

    def __post_init__(self) -> None:
        if len(self.kernel_sizes) != len(self.dilations):
            raise ValueError(f"kernel_sizes {self.kernel_sizes} and dilations {self.dilations} differ in length")
        if any(k % 2 == 0 for k in self.kernel_sizes):
            raise ValueError(f"kernel sizes must be odd for 'same' padding, got {self.kernel_sizes}")
        if self.remat not in (True, False, "branches"):
            raise ValueError(f"remat must be true, false or 'branches', got {self.remat!r}")
        if self.num_conv_res < 1 and self.num_lstm_res < 1:
            raise ValueError("a Res-CR-Net needs at least one CONV RES or LSTM RES block after the STEM")
        # tuples survive JSON round trips as lists: normalise.
        object.__setattr__(self, "kernel_sizes", tuple(int(k) for k in self.kernel_sizes))
        object.__setattr__(self, "dilations", tuple(int(d) for d in self.dilations))

    @property
    def block_channels(self) -> int:
        """Channels carried between blocks: filters per branch times branches (48 for the lung model)."""
        return self.filters * len(self.kernel_sizes)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown ModelConfig fields {sorted(unknown)}; known: {sorted(names)}")
        return cls(**d)


def lung_config(**changes: Any) -> ModelConfig:
    """The authors' lung network: STEM + 5 CONV RES + head, grayscale in, 2 classes (58,309 parameters)."""
    return ModelConfig(**changes)


def microscopy_lstm_config(**changes: Any) -> ModelConfig:
    """The authors' microscopy network: RGB in, 4 classes, STEM + 5 CONV RES + 1 LSTM RES (59,165 parameters)."""
    return ModelConfig(**{"in_channels": 3, "num_classes": 4, "num_conv_res": 5, "num_lstm_res": 1, **changes})
