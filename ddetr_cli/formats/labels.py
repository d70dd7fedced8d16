"""The label table: a model's output index -> the category id and name written to every file.

One rule, used by detect, video, eval, finetune and every format writer:

- A model fine-tuned on a COCO dataset carries that dataset's category ids (``category_ids`` in
  its config), so its pre-labels merge into the user's project (ids 3, 7, 11 stay 3, 7, 11).
- A model with the published COCO table (slot 0 unnamed: the label index *is* the COCO category
  id, with "N/A" at the unused ids) writes the true COCO ids 1..90 (80 used) and COCO names.
- Any other model numbers its labels from 1 in label order (COCO tools read id 0 as "no label").

Unnamed slots ("", "N/A", "LABEL_3") are not categories: detections there are never written.
YOLO files number the categories 0..K-1 in label order (``yolo_index``), with the names file.

Things and stuff (panoptic outputs): a category is "stuff" (``isthing`` False: every pixel of
the class in an image is one segment) when the model's config lists its id in ``stuff_ids``
(recorded from the ``isthing`` flags of the dataset it was fine-tuned on), or, for a model with
the published COCO panoptic table (the label index is the COCO panoptic category id), when the
COCO panoptic category list says so. Everything else is a thing.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

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


# COCO panoptic "stuff" categories (panopticapi's panoptic_coco_categories.json, isthing 0):
# id -> name. Its "things" are the 80 detection categories above, with the same ids and names.
COCO_PANOPTIC_STUFF: dict[int, str] = {
    92: "banner", 93: "blanket", 95: "bridge", 100: "cardboard", 107: "counter", 109: "curtain",
    112: "door-stuff", 118: "floor-wood", 119: "flower", 122: "fruit", 125: "gravel", 128: "house",
    130: "light", 133: "mirror-stuff", 138: "net", 141: "pillow", 144: "platform", 145: "playingfield",
    147: "railroad", 148: "river", 149: "road", 151: "roof", 154: "sand", 155: "sea", 156: "shelf",
    159: "snow", 161: "stairs", 166: "tent", 168: "towel", 171: "wall-brick", 175: "wall-stone",
    176: "wall-tile", 177: "wall-wood", 178: "water-other", 180: "window-blind", 181: "window-other",
    184: "tree-merged", 185: "fence-merged", 186: "ceiling-merged", 187: "sky-other-merged",
    188: "cabinet-merged", 189: "table-merged", 190: "floor-other-merged", 191: "pavement-merged",
    192: "mountain-merged", 193: "grass-merged", 194: "dirt-merged", 195: "paper-merged",
    196: "food-other-merged", 197: "building-other-merged", 198: "rock-merged", 199: "wall-other-merged",
    200: "rug-merged",
}


def coco_supercategory(cat_id: int) -> str:
    for lo, hi, name in _SUPER:
        if lo <= cat_id <= hi:
            return name
    return "object"


def coco_class_names(num_slots: int = 91) -> list[str]:
    """Label index -> name for models whose label index is the COCO category id ("" = unused slot)."""
    return [COCO_NAMES.get(i, "") for i in range(num_slots)]


def coco_panoptic_class_names(num_slots: int = 250) -> list[str]:
    """Label index -> name for the published COCO panoptic DETR models (250 slots, the label index
    is the COCO panoptic category id; "" = unused slot)."""
    names = {**COCO_NAMES, **COCO_PANOPTIC_STUFF}
    return [names.get(i, "") for i in range(num_slots)]


def is_placeholder(name: str | None, label: int) -> bool:
    """Names that mark an unused slot: empty, "N/A" (published COCO tables), "LABEL_<i>"
    (transformers' default names)."""
    return not name or name == "N/A" or name == f"LABEL_{label}"


@dataclass(frozen=True)
class Category:
    """One named model label: ``label`` is the model's output index, ``id`` the category id
    written to files, ``yolo`` the contiguous 0-based index of YOLO files."""

    label: int
    id: int
    name: str
    yolo: int
    supercategory: str = "object"
    isthing: bool = True


class LabelTable:
    """A model's label table (see the module docstring for the rule)."""

    def __init__(self, categories: Iterable[Category], num_labels: int) -> None:
        self.categories: list[Category] = sorted(categories, key=lambda c: c.label)
        self.num_labels = num_labels
        self._by_label = {c.label: c for c in self.categories}
        self._by_name = {}
        for c in self.categories:
            self._by_name.setdefault(c.name.strip().lower(), c)
        ids = [c.id for c in self.categories]
        if len(set(ids)) != len(ids):
            raise ValueError(f"category ids must be unique, got {ids}")

    @classmethod
    def from_names(cls, names: Sequence[str | None], category_ids: Sequence[int] | None = None,
                   num_labels: int | None = None, stuff_ids: Sequence[int] | None = None) -> "LabelTable":
        """Label names (placeholders for unused slots) and, for models trained on a COCO dataset,
        that dataset's id of each label -> the table. Without names at all, every label is a
        category named by its index, numbered from 1. ``stuff_ids``: the category ids that are
        stuff (default: none, or COCO panoptic's for a table in its convention)."""
        n = num_labels if num_labels is not None else len(names)
        if category_ids is not None and len(category_ids) != n:
            raise ValueError(f"{len(category_ids)} category ids for {n} labels")
        if not any(not is_placeholder(x, i) for i, x in enumerate(names)):
            names = [str(i) for i in range(n)]
        named = [(i, str(x)) for i, x in enumerate(names) if i < n and not is_placeholder(x, i)]
        coco_convention = category_ids is None and n > 1 and is_placeholder(names[0], 0)
        if stuff_ids is None and coco_convention:
            stuff_ids = [i for i, x in named if COCO_PANOPTIC_STUFF.get(i) == x]
        stuff = set(int(i) for i in stuff_ids or ())
        cats = []
        for k, (label, name) in enumerate(named):
            if category_ids is not None:
                cid = int(category_ids[label])
            else:
                cid = label if coco_convention else label + 1
            sup = coco_supercategory(cid) if COCO_NAMES.get(cid) == name else "object"
            cats.append(Category(label=label, id=cid, name=name, yolo=k, supercategory=sup, isthing=cid not in stuff))
        return cls(cats, n)

    @classmethod
    def for_config(cls, cfg) -> "LabelTable":
        """The table of a ``ModelConfig`` (its ``class_names``, ``category_ids``, ``num_classes``)."""
        return cls.from_names(list(cfg.class_names) or [""] * cfg.num_classes, list(cfg.category_ids) or None,
                              cfg.num_classes, list(cfg.stuff_ids) or None)

    def __len__(self) -> int:
        return len(self.categories)

    def __iter__(self):
        return iter(self.categories)

    def get(self, label: int) -> Category | None:
        """The category of a model label; None for an unnamed slot."""
        return self._by_label.get(int(label))

    def category_id(self, label: int) -> int | None:
        c = self._by_label.get(int(label))
        return c.id if c else None

    def name(self, label: int) -> str:
        """For people: the label's name, or its index for an unnamed slot."""
        c = self._by_label.get(int(label))
        return c.name if c else str(int(label))

    def find(self, name: str) -> Category | None:
        """Case-insensitive lookup by name."""
        return self._by_name.get(name.strip().lower())

    @property
    def labels(self) -> list[int]:
        """The named labels, in label order."""
        return [c.label for c in self.categories]

    @property
    def names(self) -> list[str]:
        """Category names in label order (= YOLO index order)."""
        return [c.name for c in self.categories]

    @property
    def has_unnamed(self) -> bool:
        return len(self.categories) < self.num_labels

    @property
    def stuff_labels(self) -> list[int]:
        """The labels whose category is stuff, in label order."""
        return [c.label for c in self.categories if not c.isthing]

    def coco_categories(self) -> list[dict]:
        """The ``categories`` list of a COCO file; with ``isthing`` when some category is stuff."""
        if self.stuff_labels:
            return self.panoptic_categories()
        return [{"id": c.id, "name": c.name, "supercategory": c.supercategory} for c in self.categories]

    def panoptic_categories(self) -> list[dict]:
        """The ``categories`` list of a COCO panoptic file (with ``isthing`` 1 or 0)."""
        return [{"id": c.id, "name": c.name, "supercategory": c.supercategory, "isthing": int(c.isthing)}
                for c in self.categories]
