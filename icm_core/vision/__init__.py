"""Vision: detection tasks (MTCNN on CPU, transformers detectors on GPU workers), COCO mAP, CLIP task vectors."""
