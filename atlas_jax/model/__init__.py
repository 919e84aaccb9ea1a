"""The Qwen2.5-VL-family model in Flax NNX, with functional-token visual-operation modules.

config.py (dataclasses, HF config.json), layers.py (Dense / RMSNorm / SwiGLU / attention with
logical axes), vision.py + vision_layout.py (ViT), rope.py (M-RoPE), decoder.py (Qwen2 layers,
KV cache), visual_ops.py, vlm.py (the model), extend.py (adding functional tokens),
functional_rows.py (vocabulary rows), presets.py (sizes).
"""
