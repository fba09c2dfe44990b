"""The model's static-shape input contract (`model_inputs`), the 3-D MRoPE position ids (`positions`) and the
ViT's grid-dependent host inputs (`patch_geometry`), all computed on the host in numpy."""
