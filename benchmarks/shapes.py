"""Parameter shapes shared by the benchmarks and the tests that measure at their size (NumPy only)."""


def resnet18_shapes(num_classes: int = 1000) -> dict:
  """Parameter shapes of torchvision's ResNet-18 (HWIO kernels), 11.69M in all."""
  shapes = {"conv1": (7, 7, 3, 64), "bn1_scale": (64,), "bn1_bias": (64,)}
  in_ch = 64
  for stage, out_ch in enumerate((64, 128, 256, 512), start=1):
    for block in range(2):
      prefix = f"layer{stage}_{block}"
      shapes[f"{prefix}_conv1"] = (3, 3, in_ch, out_ch)
      shapes[f"{prefix}_conv2"] = (3, 3, out_ch, out_ch)
      for bn in ("bn1", "bn2"):
        shapes[f"{prefix}_{bn}_scale"] = (out_ch,)
        shapes[f"{prefix}_{bn}_bias"] = (out_ch,)
      if block == 0 and stage > 1:
        shapes[f"{prefix}_downsample_conv"] = (1, 1, in_ch, out_ch)
        shapes[f"{prefix}_downsample_bn_scale"] = (out_ch,)
        shapes[f"{prefix}_downsample_bn_bias"] = (out_ch,)
      in_ch = out_ch
  shapes["fc_kernel"] = (512, num_classes)
  shapes["fc_bias"] = (num_classes,)
  return shapes
