"""Product detection: the model and its backbones (``model``), the main-object rule
(``main_object``), COCO data and the training Dataset (``data``), evaluation (``evaluate``),
training (``train``), pseudo-labelling rounds (``pseudo_label``) and the boxes of catalog rows
that have none (``crops``). Import the module you need by path: ``model`` pulls in
torchvision, ``data`` pycocotools.
"""
