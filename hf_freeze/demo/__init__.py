"""Offline demo pieces: real digit images from scikit-learn and a small pretrained ResNet built from them."""

#: the policy of ``make demo`` and of the example script's embedded default
DEFAULT_POLICY = "freeze=backbone;unfreeze=epoch3:1@0.3,epoch6:1@0.1;layer_lr_decay=0.8"
