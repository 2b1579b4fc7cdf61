"""Offline demo pieces: real digit images from scikit-learn and a small pretrained ResNet built from them."""
