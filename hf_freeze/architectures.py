"""The one table of architecture knowledge: how each model type splits into layer groups.

Every entry is a :class:`Layout` of regular expressions over parameter/buffer names (relative to
the ``*ForImageClassification`` model, ``{base}`` standing for the escaped base-model prefix).
``groups.py`` turns a layout into ``stem``, ``stage.0..K``, ``neck`` and ``head``:

* ``head`` names match a ``head`` pattern (everything that maps features to logits);
* ``stem``/``neck`` names match an explicit ``stem``/``neck`` pattern;
* the first capture group of ``stages`` is the depth unit (renumbered 0..K in order);
* any other name takes its place by registration order: before the first stage -> ``stem``,
  after the last -> ``neck``, between two stages -> the *next* stage (it is that stage's
  downsampling/embedding).

A model type not in the table falls back to :func:`hf_freeze.groups.discover_layout`.

``classifier`` says where the classifier lives, for a task-specific head (:mod:`hf_freeze.heads`): the dotted
names of the ``nn.Linear`` layer(s) that map pooled features to logits; their ``in_features`` is the head's input
width. A head spec goes on each one the model has (a distillation variant has two: DeiT's
``cls_classifier``/``distillation_classifier``, LeViT's ``classifier``/``classifier_distill``, SwiftFormer's
``head``/``dist_head``, whose logits are averaged). ``()``: no head can be put on it (the reason is refused).
For ``timm_wrapper`` it is the timm model's own ``pretrained_cfg["classifier"]`` (:func:`timm_classifier`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Layout:
    stages: str
    head: tuple[str, ...] = (r"^classifier\.",)
    stem: tuple[str, ...] = ()
    neck: tuple[str, ...] = ()
    #: why the model cannot take the standard ``pixel_values``/``labels`` path (None: it can)
    input_issue: str | None = None
    #: set when the model is not an image classifier at all: layer_groups() refuses it
    not_a_classifier: str | None = None
    #: why the frozen-prefix cache cannot run this model from a stage output (None: the probe decides)
    prefix_issue: str | None = None
    source: str = "table"
    #: the Linear layer(s) mapping features to logits, where a task-specific head goes (see the module docstring)
    classifier: tuple[str, ...] = ("classifier",)


_VIT = Layout(stages=r"^{base}\.layers\.(\d+)\.",
              head=(r"^(classifier|cls_classifier|distillation_classifier)\.",),
              classifier=("classifier", "cls_classifier", "distillation_classifier"))
_VIT_ENCODER = Layout(stages=r"^{base}\.encoder\.layer\.(\d+)\.")
_VISION_TOWER = Layout(stages=r"^vision_model\.encoder\.layers\.(\d+)\.")
_SWIN = Layout(stages=r"^{base}\.encoder\.layers\.(\d+)\.")
_STAGES = Layout(stages=r"^{base}\.encoder\.stages\.(\d+)\.")
_FLAT = Layout(stages=_STAGES.stages, classifier=("classifier.1",))  # classifier = Sequential(Flatten, Linear)
_MOBILE = Layout(stages=r"^{base}\.layer\.(\d+)\.")
_MOBILEVIT = Layout(stages=r"^{base}\.encoder\.layer\.(\d+)\.")
_BLOCK = Layout(stages=r"^{base}\.encoder\.(?:block|patch_embeddings)\.(\d+)\.",
                stem=(r"^{base}\.encoder\.patch_embeddings\.0\.",), head=(r"^(norm|classifier)\.",))

ARCHITECTURES: dict[str, Layout] = {
    # plain ViTs (transformers v5 names their blocks <base>.layers.N)
    "vit": _VIT, "vit_msn": _VIT, "deit": _VIT, "ijepa": _VIT, "beit": _VIT,
    "data2vec-vision": _VIT_ENCODER, "dinov2": _VIT_ENCODER, "dinov2_with_registers": _VIT_ENCODER,
    # CLIP-like towers: the vision tower is `vision_model`, not the base_model_prefix
    "clip": _VISION_TOWER, "metaclip_2": _VISION_TOWER, "siglip": _VISION_TOWER,
    "siglip2": Layout(stages=_VISION_TOWER.stages, input_issue=(
        "SigLIP2 takes pixel_values already cut into patches, plus pixel_attention_mask and spatial_shapes, "
        "as produced by Siglip2ImageProcessor; a plain (B, 3, H, W) collator does not fit it")),
    # hierarchical transformers
    "swin": _SWIN, "swinv2": _SWIN, "donut-swin": _SWIN,
    "dinat": Layout(stages=r"^{base}\.encoder\.levels\.(\d+)\."),
    "pvt_v2": Layout(stages=r"^{base}\.encoder\.layers\.(\d+)\.",
                     stem=(r"^{base}\.encoder\.layers\.0\.patch_embedding\.",)),
    "segformer": Layout(stages=r"^{base}\.stages\.(\d+)\.", stem=(r"^{base}\.stages\.0\.patch_embeddings\.",)),
    "poolformer": _BLOCK,
    "pvt": Layout(stages=_BLOCK.stages, stem=_BLOCK.stem),
    # CNN-style stages
    "convnext": _STAGES, "convnextv2": _STAGES, "focalnet": _STAGES, "hiera": _STAGES,
    "resnet": _FLAT, "regnet": _FLAT, "bit": _FLAT,
    "cvt": Layout(stages=r"^{base}\.encoder\.stages\.(\d+)\.", stem=(r"^{base}\.encoder\.stages\.0\.embedding\.",),
                  head=(r"^(layernorm|classifier)\.",)),
    "levit": Layout(stages=r"^{base}\.encoder\.stages\.(\d+)\.", head=(r"^classifier(_distill)?\.",),
                    classifier=("classifier.linear", "classifier_distill.linear")),
    "efficientnet": Layout(stages=r"^{base}\.encoder\.blocks\.(\d+)\."),
    "mobilenet_v1": _MOBILE, "mobilenet_v2": _MOBILE,
    "mobilevit": _MOBILEVIT, "mobilevitv2": _MOBILEVIT,
    "swiftformer": Layout(stages=r"^{base}\.encoder\.network\.(\d+)\.blocks\.", head=(r"^(norm|head|dist_head)\.",),
                          classifier=("head", "dist_head")),
    "hgnet_v2": Layout(stages=r"^encoder\.stages\.(\d+)\.", head=(r"^(fc|classifier)\.",), classifier=("fc",)),
    "textnet": Layout(stages=r"^{base}\.encoder\.stages\.(\d+)\.", head=(r"^(fc|classifier)\.",), classifier=("fc",)),
    # types that do not take pixel_values + labels
    "perceiver": Layout(stages=r"^perceiver\.encoder\.self_attends\.(\d+)\.", head=(r"^perceiver\.decoder\.",), classifier=(),
                        input_issue="Perceiver takes its image as `inputs=`, not `pixel_values=`; "
                                    "the standard image-classification collator/Trainer path does not feed it"),
    "imagegpt": Layout(stages=r"^transformer\.h\.(\d+)\.", head=(r"^score\.",), classifier=(),
                       input_issue="ImageGPT takes colour-clustered `input_ids`, not `pixel_values`"),
    "pp_lcnet": Layout(stages=r"^encoder\.blocks\.(\d+)\.", head=(r"^head\.",), classifier=(),
                       input_issue="PP-LCNet takes no `labels` and returns no loss (logits come in "
                                   "`last_hidden_state`); the Trainer cannot compute a loss for it"),
    "shieldgemma2": Layout(stages="", classifier=(), not_a_classifier=(
        "ShieldGemma2ForImageClassification is a safety judge built on a language model (yes/no token "
        "logits from text + image tokens), not a pixel_values -> labels classifier; fine-tune it as a "
        "language model instead")),
}

#: model type of transformers' timm integration: groups come from timm's own ``group_matcher``
TIMM_MODEL_TYPE = "timm_wrapper"


def timm_classifier(model) -> tuple[str, ...]:
    """Where a ``TimmWrapperForImageClassification``'s classifier lives: timm's ``pretrained_cfg["classifier"]``
    (a name or a tuple of names, e.g. ``fc``, ``head.fc``) under ``timm_model``."""
    names = getattr(model.timm_model, "pretrained_cfg", {}).get("classifier") or ()
    return tuple(f"timm_model.{n}" for n in ((names,) if isinstance(names, str) else names))
