"""Class-name tables for published weights."""

from __future__ import annotations

_SUPER = [
    (1, 1, "person"), (2, 9, "vehicle"), (10, 15, "outdoor"), (16, 25, "animal"), (27, 33, "accessory"),
    (34, 43, "sports"), (44, 51, "kitchen"), (52, 61, "food"), (62, 70, "furniture"), (72, 77, "electronic"),
    (78, 82, "appliance"), (84, 90, "indoor"),
]

# COCO 2017 detection categories: id -> name (80 of the ids 1..90 are used).
COCO_NAMES: dict[int, str] = {
    1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 5: "airplane", 6: "bus", 7: "train", 8: "truck",
    9: "boat", 10: "traffic light", 11: "fire hydrant", 13: "stop sign", 14: "parking meter", 15: "bench",
    16: "bird", 17: "cat", 18: "dog", 19: "horse", 20: "sheep", 21: "cow", 22: "elephant", 23: "bear",
    24: "zebra", 25: "giraffe", 27: "backpack", 28: "umbrella", 31: "handbag", 32: "tie", 33: "suitcase",
    34: "frisbee", 35: "skis", 36: "snowboard", 37: "sports ball", 38: "kite", 39: "baseball bat",
    40: "baseball glove", 41: "skateboard", 42: "surfboard", 43: "tennis racket", 44: "bottle",
    46: "wine glass", 47: "cup", 48: "fork", 49: "knife", 50: "spoon", 51: "bowl", 52: "banana", 53: "apple",
    54: "sandwich", 55: "orange", 56: "broccoli", 57: "carrot", 58: "hot dog", 59: "pizza", 60: "donut",
    61: "cake", 62: "chair", 63: "couch", 64: "potted plant", 65: "bed", 67: "dining table", 70: "toilet",
    72: "tv", 73: "laptop", 74: "mouse", 75: "remote", 76: "keyboard", 77: "cell phone", 78: "microwave",
    79: "oven", 80: "toaster", 81: "sink", 82: "refrigerator", 84: "book", 85: "clock", 86: "vase",
    87: "scissors", 88: "teddy bear", 89: "hair drier", 90: "toothbrush",
}


def coco_supercategory(cat_id: int) -> str:
    for lo, hi, name in _SUPER:
        if lo <= cat_id <= hi:
            return name
    return "object"


def coco_class_names(num_slots: int = 91) -> list[str]:
    """Label index -> name for models whose label index is the COCO category id ("" = unused slot)."""
    return [COCO_NAMES.get(i, "") for i in range(num_slots)]
