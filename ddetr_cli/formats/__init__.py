"""What goes into files: the label table (category ids), COCO / YOLO / VOC writers, mask
polygons. A leaf: imports nothing else of the package."""
