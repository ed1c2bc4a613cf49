"""ResNet-50 checkpoints -> `rsvl_jax.models.resnet.ResNet` (family `resnet50`).

Accepted key layouts (detected from the stem conv key):

* "torchvision": `conv1`, `bn1`, `layer{1..4}.{b}.{conv1,bn1,...,downsample.0,downsample.1}`
  (torchvision and the RSP/AID scene-recognition checkpoint of spec §6.5, whose `{'model': ...}`
  wrapper and `module.` prefix the reader strips); `fc.*` is dropped.
* "pir": PIR's re-indexed `Sequential` (`0.weight`, `1.*`, `4..7.{b}.*`), bare or under
  `conv_encoder.` (spec §6.1). The reference loads torchvision names into this Sequential,
  where none match (quirk Q1); here both load.
* "hf": transformers `ResNetModel` with `layer_type="bottleneck"`,
  `downsample_in_bottleneck=False` (stride on the 3x3 conv = v1.5), bare or under `resnet.`
  (`ResNetForImageClassification`, whose `classifier.*` is dropped).

BatchNorm: weight -> scale, bias -> bias, running_mean/var -> mean/var (batch stats);
`num_batches_tracked` is dropped (our momentum is fixed, so it is not needed).
"""
from __future__ import annotations

from rsvl_jax.convert import Family
from rsvl_jax.convert.core import ConversionError, Entry, Skip, Tensors, conv, strip_prefix
from rsvl_jax.models.resnet import PRESETS, ResNet, ResNetConfig

LAYOUTS = ("torchvision", "pir", "hf")
# Per layout: the stem's conv and BN, the prefix of stage k's block b, and the block's sub-module names.
_STEM = {
    "torchvision": ("conv1", "bn1"),
    "pir": ("0", "1"),
    "hf": ("embedder.embedder.convolution", "embedder.embedder.normalization"),
}
_BLOCK = {
    "torchvision": lambda k, b: f"layer{k + 1}.{b}",
    "pir": lambda k, b: f"{k + 4}.{b}",
    "hf": lambda k, b: f"encoder.stages.{k}.layers.{b}",
}
_TV_PARTS = {"conv1": "conv1", "bn1": "bn1", "conv2": "conv2", "bn2": "bn2", "conv3": "conv3", "bn3": "bn3",
             "down_conv": "downsample.0", "down_bn": "downsample.1"}
_HF_PARTS = {"conv1": "layer.0.convolution", "bn1": "layer.0.normalization",
             "conv2": "layer.1.convolution", "bn2": "layer.1.normalization",
             "conv3": "layer.2.convolution", "bn3": "layer.2.normalization",
             "down_conv": "shortcut.convolution", "down_bn": "shortcut.normalization"}

SKIPS = [
    Skip("BatchNorm num_batches_tracked", r"(.*\.)?num_batches_tracked"),
    Skip("classifier (not built: the trunk ends at the average pool)", r"(fc|classifier)\..*"),
]


def _bn(target: str, source: str) -> list[Entry]:
    return [
        Entry(f"{target}.scale", (f"{source}.weight",)),
        Entry(f"{target}.bias", (f"{source}.bias",)),
        Entry(f"{target}.mean", (f"{source}.running_mean",)),
        Entry(f"{target}.var", (f"{source}.running_var",)),
    ]


def table(config: ResNetConfig, layout: str = "torchvision") -> tuple[list[Entry], list[Skip]]:
    """Entries for un-prefixed keys of one layout ("torchvision", "pir" or "hf").

    The PIR converter re-roots the "pir" table with `core.prefixed(entries, "conv_encoder", "conv_encoder.")`.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown ResNet layout {layout!r} (known: {', '.join(LAYOUTS)})")
    parts = _HF_PARTS if layout == "hf" else _TV_PARTS
    stem_conv, stem_bn = _STEM[layout]
    e = [Entry("conv1.kernel", (f"{stem_conv}.weight",), conv), *_bn("bn1", stem_bn)]
    for k, depth in enumerate(config.layers):
        for b in range(depth):
            t, s = f"stages.{k}.{b}", _BLOCK[layout](k, b)
            names = ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3") + (("down_conv", "down_bn") if b == 0 else ())
            for name in names:
                src = f"{s}.{parts[name]}"
                if "conv" in name:
                    e.append(Entry(f"{t}.{name}.kernel", (f"{src}.weight",), conv))
                else:
                    e += _bn(f"{t}.{name}", src)
    return e, list(SKIPS)


# Stem conv key (after prefix stripping) -> layout.
_ANCHORS = {"conv1.weight": "torchvision", "0.weight": "pir", "embedder.embedder.convolution.weight": "hf"}
_PREFIXES = ("conv_encoder.", "resnet.", "")


def detect(tensors: Tensors) -> tuple[str, str]:
    """(prefix, layout) of a ResNet state dict, or a ConversionError naming what was seen."""
    for prefix in _PREFIXES:
        for anchor, layout in _ANCHORS.items():
            if prefix + anchor in tensors:
                return prefix, layout
    sample = ", ".join(sorted(tensors)[:8])
    raise ConversionError(
        "not a ResNet checkpoint: no stem conv key "
        f"({', '.join(_ANCHORS)}) bare or under {[p for p in _PREFIXES if p]} (first keys: {sample})"
    )


def plan(config: ResNetConfig, tensors: Tensors):
    prefix, layout = detect(tensors)
    if prefix:
        tensors = strip_prefix(tensors, prefix)
    entries, skips = table(config, layout)
    return tensors, entries, skips


def build(config: ResNetConfig, rngs) -> ResNet:
    return ResNet(config, rngs=rngs)


FAMILY = Family("resnet50", PRESETS, build, plan)

__all__ = ["FAMILY", "LAYOUTS", "SKIPS", "detect", "table", "plan", "build"]
