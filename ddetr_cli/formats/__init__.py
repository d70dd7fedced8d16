"""The file formats, one module each with its reader and its writer (``coco``, ``yolo``,
``voc``; ``labelstudio`` writes only), the neutral form they share (``annotations``), the label
table (category ids) and mask polygons. A leaf: imports nothing else of the package but files."""
