"""Evaluation: held-out loss per modality during training, zero-shot image->text
classification, text->image generation judged by a classifier, and FLOPs accounting."""
