"""The peer in the transfer benchmark: PyTorch Lightning's ``BackboneFinetuning`` on the same HF model.

``BackboneFinetuning`` needs a LightningModule with a ``backbone`` attribute; here it is the HF base
model (``model.mobilenet_v2``), and the head is the HF classifier. The set-up follows Lightning's
documentation and its ``computer_vision_fine_tuning`` example: the optimizer gets the parameters
that are trainable when training starts (the head, plus BatchNorm affine weights, which
``train_bn=True``, the default, leaves trainable); at ``unfreeze_backbone_at_epoch`` the callback adds
the backbone as a new parameter group at a tenth of the head's LR, raised x1.5 per epoch until it
reaches the head's. Same data, batch size, optimizer (AdamW, constant LR, no weight decay) and
epochs as the hf_freeze strategies in ``transfer.py``.
"""

from __future__ import annotations

import logging
import warnings

import torch
from torch import nn


def make_module(hf_model: nn.Module, lr: float, train_mode: bool = False):
    """A LightningModule around an HF image classifier; ``backbone`` is its base model.

    Lightning 2.x keeps each submodule's train/eval mode as it finds it (it warns about modules in eval mode),
    and ``from_pretrained`` returns the HF model in eval mode: so by default the peer trains with BatchNorm
    statistics fixed and dropout off. ``train_mode=True`` calls ``model.train()`` when training starts, as the
    warning suggests and as the transformers Trainer does on every step.
    """
    import pytorch_lightning as pl

    class HFClassifier(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = hf_model
            self.backbone = getattr(hf_model, hf_model.base_model_prefix)

        def on_train_start(self):
            if train_mode:
                self.model.train()

        def training_step(self, batch, batch_idx):
            return self.model(pixel_values=batch["pixel_values"], labels=batch["labels"]).loss

        def configure_optimizers(self):
            trainable = [p for p in self.parameters() if p.requires_grad]
            return torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)

    return HFClassifier()


def train_lightning(hf_model: nn.Module, dataset, *, epochs: int, batch_size: int, lr: float, seed: int,
                    unfreeze_at_epoch: int, train_bn: bool = True, train_mode: bool = False) -> dict:
    """Fit ``hf_model`` in place with ``BackboneFinetuning``; returns what the benchmark records."""
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import BackboneFinetuning

    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="pytorch_lightning")
    pl.seed_everything(seed, workers=True, verbose=False)
    module = make_module(hf_model, lr, train_mode)
    finetuning = BackboneFinetuning(unfreeze_backbone_at_epoch=unfreeze_at_epoch, train_bn=train_bn)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, callbacks=[finetuning], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0)
    trainer.fit(module, train_dataloaders=loader)
    return {"steps": trainer.global_step,
            "lr_groups": [g["lr"] for g in trainer.optimizers[0].param_groups]}
