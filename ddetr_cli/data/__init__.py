"""Input data: datasets (COCO / YOLO / VOC folders, parsed by ``formats``), training transforms,
image and stream sources, the synthetic generator and the COCO val download."""
