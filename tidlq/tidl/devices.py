"""The TIDL target devices and what each one needs (reference/tidl.md §1a, §2, §3): one typed record per device,
read by the quantization recipe, the export, the lint and the compile options instead of comparing device names."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Device:
    """A TIDL target device."""

    name: str
    soc: str  # what `export SOC=...` selects in edgeai-tidl-tools
    mmav1: bool  # TDA4VM / AM68PA: symmetric, power-of-2 scales only (quantization_scale_type 1), stricter layers
    conv3x3_stride3: bool = True  # AM62A / AM67A do not take a 3x3 convolution with stride 3

    @property
    def power_of_2(self) -> bool:
        """Whether TIDL takes only symmetric, power-of-2 scales on this device."""
        return self.mmav1

    @property
    def quantization_scale_type(self) -> int:
        """TIDL's `advanced_options:quantization_scale_type` for a pre-quantized model: 1 (power-of-2) on MMAv1,
        4 (asymmetric, per-channel) elsewhere."""
        return 1 if self.mmav1 else 4


DEVICES: dict[str, Device] = {d.name: d for d in (
    Device("am62a", "am62a", mmav1=False, conv3x3_stride3=False),
    Device("am67a", "am67a", mmav1=False, conv3x3_stride3=False),
    Device("am68a", "am68a", mmav1=False),
    Device("am69a", "am69a", mmav1=False),
    Device("tda4vm", "am68pa", mmav1=True),
    Device("am68pa", "am68pa", mmav1=True),
)}


def device(name: str) -> Device:
    """The device called `name` (params validate `tidl.target_device` against TARGET_DEVICES)."""
    return DEVICES[name]
