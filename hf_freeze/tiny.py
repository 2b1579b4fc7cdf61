"""Tiny random configs for every model type in transformers' image-classification mapping.

A feature, not a test helper: ``hf-freeze inspect tiny:<model_type>`` shows the layer groups of any
architecture offline, without downloading a config (checked at parse time against :data:`CFG`), and
:func:`tiny_model` builds one with random weights to try a policy on (the tests and benchmarks use it
too). The values were checked to build and run forward+backward on CPU with transformers 5.24 (32 px
input; 64 px for hiera, levit, mobilevitv2). Importing this module loads neither torch nor transformers.
"""

from __future__ import annotations

from ._compat import moved_names

VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, image_size=32, patch_size=8)
CLIPV = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, image_size=32, patch_size=8)
TXT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37, vocab_size=99)
SWIN = dict(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4)
CFG = {
    "beit": dict(VIT, use_mean_pooling=True),
    "bit": dict(embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1], num_groups=8, layer_type="bottleneck"),
    "clip": dict(vision_config=CLIPV, text_config=TXT),
    "convnext": dict(hidden_sizes=[16, 32], depths=[1, 1], num_stages=2, image_size=32),
    "convnextv2": dict(hidden_sizes=[16, 32], depths=[1, 1], num_stages=2, image_size=32),
    "cvt": dict(embed_dim=[16, 32, 48], num_heads=[1, 2, 3], depth=[1, 2, 3]),
    "data2vec-vision": dict(VIT, use_mean_pooling=True),
    "deit": VIT,
    "dinat": dict(embed_dim=16, depths=[1, 1], num_heads=[1, 2], kernel_size=3, dilations=[[1], [1]], image_size=32),
    "dinov2": dict(VIT, mlp_ratio=2),
    "dinov2_with_registers": dict(VIT, mlp_ratio=2, num_register_tokens=2),
    "donut-swin": SWIN,
    "efficientnet": dict(image_size=32, width_coefficient=0.1, depth_coefficient=1.0, kernel_sizes=[3, 3], in_channels=[32, 16],
                         out_channels=[16, 24], strides=[1, 2], num_block_repeats=[1, 1], expand_ratios=[1, 2], hidden_dim=128),
    "focalnet": dict(image_size=32, patch_size=4, embed_dim=16, hidden_sizes=[16, 32], depths=[1, 1], focal_levels=[2, 2], focal_windows=[3, 3]),
    "hgnet_v2": dict(embedding_size=16, depths=[1, 1], hidden_sizes=[32, 64], stem_channels=[3, 16, 16],
                     stage_in_channels=[16, 32], stage_mid_channels=[16, 16], stage_out_channels=[32, 64], stage_num_blocks=[1, 1],
                     stage_downsample=[False, True], stage_light_block=[False, True], stage_kernel_size=[3, 3], stage_numb_of_layers=[2, 2]),
    "hiera": dict(image_size=[64, 64], mlp_ratio=1.0, depths=[1, 1, 1, 1], patch_stride=[4, 4], patch_size=[3, 3], patch_padding=[1, 1],
                  masked_unit_size=[8, 8], num_heads=[1, 1, 1, 1], embed_dim_multiplier=2.0, embed_dim=8),
    "ijepa": VIT,
    "imagegpt": dict(n_embd=32, n_layer=2, n_head=2, n_positions=64, vocab_size=513),
    "levit": dict(image_size=64, hidden_sizes=[16, 32, 48], num_attention_heads=[1, 2, 3], depths=[1, 1, 1], key_dim=[8, 8, 8],
                  mlp_ratio=[2, 2, 2], attention_ratio=[2, 2, 2], patch_size=16),
    "metaclip_2": dict(vision_config=CLIPV, text_config=TXT),
    "mobilenet_v1": dict(image_size=32, depth_multiplier=0.25),
    "mobilenet_v2": dict(image_size=32, depth_multiplier=0.25),
    "mobilevit": dict(image_size=32, hidden_sizes=[16, 16, 16], neck_hidden_sizes=[8, 8, 16, 16, 16, 16, 32], num_attention_heads=2),
    "mobilevitv2": dict(image_size=32, width_multiplier=0.25, n_attn_blocks=[1, 1, 1], base_attn_unit_dims=[16, 16, 16]),
    "perceiver": dict(num_latents=8, d_latents=32, d_model=512, num_self_attends_per_block=1, num_self_attention_heads=2,
                      num_cross_attention_heads=1, image_size=16),
    "poolformer": dict(hidden_sizes=[16, 32], depths=[1, 1], num_encoder_blocks=2, patch_sizes=[7, 3], strides=[4, 2], padding=[2, 1]),
    "pp_lcnet": dict(block_configs=[[[3, 8, 16, 1, False]], [[3, 16, 16, 2, False]], [[3, 16, 32, 2, False]], [[3, 32, 32, 2, False]], [[3, 32, 32, 2, True]]], stem_channels=8,
                     class_expand=32),
    "pvt": dict(image_size=32, num_encoder_blocks=2, depths=[1, 1], hidden_sizes=[16, 32], patch_sizes=[4, 2], strides=[4, 2],
                sequence_reduction_ratios=[2, 1], num_attention_heads=[1, 2], mlp_ratios=[2, 2]),
    "pvt_v2": dict(image_size=32, num_encoder_blocks=2, depths=[1, 1], hidden_sizes=[16, 32], patch_sizes=[7, 3], strides=[4, 2],
                   sr_ratios=[2, 1], num_attention_heads=[1, 2], mlp_ratios=[2, 2]),
    "regnet": dict(embedding_size=8, hidden_sizes=[16, 32], depths=[1, 1], groups_width=8, layer_type="y"),
    "resnet": dict(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic"),
    "segformer": dict(num_encoder_blocks=2, depths=[1, 1], hidden_sizes=[16, 32], patch_sizes=[7, 3], strides=[4, 2],
                      sr_ratios=[2, 1], num_attention_heads=[1, 2], mlp_ratios=[2, 2], decoder_hidden_size=32),
    "shieldgemma2": dict(text_config=dict(vocab_size=128, hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                                          num_key_value_heads=1, head_dim=16, layer_types=["full_attention"]),
                         vision_config=dict(CLIPV, num_hidden_layers=1), mm_tokens_per_image=4, image_token_index=127,
                         boi_token_index=125, eoi_token_index=126),
    "siglip": dict(vision_config=CLIPV, text_config=TXT),
    "siglip2": dict(vision_config=dict(CLIPV, num_patches=16), text_config=TXT),
    "swiftformer": dict(image_size=32, depths=[1, 1, 1, 1], embed_dims=[16, 16, 32, 32]),
    "swin": SWIN,
    "swinv2": SWIN,
    "textnet": dict(stem_out_channels=8, image_size=[32, 32], conv_layer_kernel_sizes=[[[3, 3]], [[3, 3]]], conv_layer_strides=[[1], [2]],
                    hidden_sizes=[8, 8, 16]),
    "timm_wrapper": dict(architecture="test_resnet", model_args={}),
    "vit": VIT,
    "vit_msn": VIT,
}

IMAGE_SIZE = {"hiera": 64, "levit": 64, "mobilevitv2": 64, "perceiver": 16}


def tiny_config(model_type: str, num_labels: int = 3):
    # transformers loads only when a config is built: checks.py reads CFG while hf-freeze parses its arguments
    from transformers import CONFIG_MAPPING

    if model_type not in CFG:
        raise KeyError(f"no tiny config for {model_type!r}; known: {', '.join(sorted(CFG))}")
    return CONFIG_MAPPING[model_type](**CFG[model_type], num_labels=num_labels)


def tiny_model(model_type: str, num_labels: int = 3, seed: int = 0):
    """A randomly initialised tiny classifier of ``model_type`` (the mapping's first class)."""
    # torch loads only when a model is built: checks.py reads CFG while hf-freeze parses its arguments
    import torch

    from .loading import classifier_class

    torch.manual_seed(seed)
    config = tiny_config(model_type, num_labels)
    return classifier_class(config)(config)


__getattr__ = moved_names(__name__, {"image_classifier_class_names": "loading"})
