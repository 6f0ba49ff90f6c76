"""preprocessing.json: everything needed to turn an image file into the exported model's input, without
this project. The model itself holds the normalisation (mean/std, recorded here for reference only)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from export.layout import INPUT_NAME, OUTPUT_NAME

RESIZE_RULES = {
    "squash": "stretch to height x width (aspect ratio not kept); OpenCV INTER_AREA when shrinking either side, "
              "else INTER_LINEAR",
    "letterbox": "scale by min(height/h, width/w) keeping the aspect ratio (rounded sides, at least 1 pixel; "
                 "INTER_AREA when shrinking, else INTER_LINEAR), centre on a zero (black) canvas, offsets floored",
}
DECODE_RULES = [
    "PNG/JPEG/BMP/TIFF: decode with PIL, apply the EXIF orientation",
    ">8-bit and float images: min-max window of the image's own range to 0..255 (rounded, clipped)",
    "channels 3: convert to RGB (alpha dropped); channels 1: convert to 8-bit grayscale (L)",
    "DICOM: modality LUT, then the window below (or the file's VOI LUT/window, else min-max), MONOCHROME1 inverted",
    "the result is uint8 (height, width, channels); a batch stacks images on a new first axis",
]


def preprocessing(model, dicom) -> dict[str, Any]:
    """The preprocessing description of a trained `ImageClassifier` and its DataModule's DICOM settings.

    Args:
        model: the trained model (its hparams hold classes, image size, channels, resize mode).
        dicom: the DataModule's `DicomConfig`.
    """
    hp = model.hparams
    size = hp["image_size"]
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    channels = int(hp.get("in_chans", 3))
    resize = hp.get("resize") or "squash"  # checkpoints from before the mode was stored were all squashed
    classes = list(model.classes)
    window = dicom.center_width()
    return {
        "classes": classes,
        "positive_class": classes[model.positive_index] if len(classes) == 2 else None,
        "channels": channels,
        "color": "RGB" if channels == 3 else "grayscale",
        "input_size": {"height": int(height), "width": int(width)},
        "resize": resize,
        "resize_rule": RESIZE_RULES[resize],
        "dicom": {**asdict(dicom), "center": window[0] if window else None, "width": window[1] if window else None},
        "decode": DECODE_RULES,
        "input": {"name": INPUT_NAME, "dtype": "uint8", "layout": "NHWC", "shape": ["batch", int(height), int(width), channels],
                  "range": [0, 255]},
        "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": ["batch", len(classes)],
                   "meaning": "class probabilities in the order of `classes` (they sum to 1)"},
        "normalization": {"inside_model": True, "scale": "1/255", "mean": model.net.mean.flatten().tolist(),
                          "std": model.net.std.flatten().tolist()},
    }
