"""ImageNet, ResNet-34 -> ResNet-18: the published KD recipe (CRD / DKD tables).

    python launch.py --config=configs/imagenet_r34_r18.py --workdir=W        # KD
    python launch.py --config=configs/imagenet_r34_r18.py:dkd --workdir=W    # DKD

KD: T 1, CE 0.5 + KD 0.5, SGD momentum 0.9, lr 0.2 at batch 512 (scaled
linearly with the global batch), 100 epochs, x0.1 at 30/60/90, weight decay
1e-4 (published: KD 71.03-71.37 top-1; DKD 71.70). DKD: CE 1, alpha 1,
beta 0.5, T 1, a 1-epoch warm-up (mdistiller's imagenet/r34_r18 DKD config).
The teacher trains first with torchvision's ResNet recipe (lr 0.1 at batch
256, 90 epochs, x0.1 at 30/60); torchvision's pretrained ResNet-34 saved as
safetensors (docs/own_models.md) is used as it is with
--config.teacher.weights=FILE --config.teacher.epochs=0. TFDS's imagenet2012 needs the ImageNet tar files placed by hand in
its manual download folder; an image folder works too (data.source=folder).
Data: streamed (data.in_memory auto: 1.28M images decoded at 224 x 224 take
about 190 GB), which needs TFDS's imagenet2012 prepared as ArrayRecord
(`tfds build imagenet2012 --file_format=array_record`) or an image folder;
random resized crops of the full-resolution images and flips on the host;
evaluation on the central 224 x 224 of images resized to 256 on the shorter
side, as published.
"""

from configs import default


def _sgd(learning_rate: float, reference_batch_size: int, decay_epochs: tuple):
  return default.optimizer_config(
      name="sgd",
      learning_rate=learning_rate,
      reference_batch_size=reference_batch_size,
      momentum=0.9,
      weight_decay=1e-4,
      schedule="step",
      decay_epochs=decay_epochs,
      decay_factor=0.1,
      grad_clip_norm=0.0,
  )


def get_config(method: str = "kd"):
  """The recipe for METHOD, kd or dkd."""
  if method not in ("kd", "dkd"):
    raise ValueError(f"unknown config argument {method!r}; use kd or dkd")
  config = default.get_config()
  config.data.update(
      source="tfds",
      name="imagenet2012",
      test_split="validation",
      image_size=224,
      augment="resized_crop_flip",
      eval_crop=0.875,  # the published protocol: shorter side 256, centre 224
  )
  config.teacher.update(
      model="resnet34", epochs=90, batch_size=256, optimizer=_sgd(0.1, 256, (30, 60))
  )
  config.student.update(
      model="resnet18", epochs=100, batch_size=512, optimizer=_sgd(0.2, 512, (30, 60, 90))
  )
  if method == "kd":
    config.distill.update(method="kd", temperature=1.0, alpha=0.5)
  else:
    config.distill.update(
        method="dkd",
        temperature=1.0,
        dkd_alpha=1.0,
        dkd_beta=0.5,
        dkd_ce_weight=1.0,
        dkd_warmup_epochs=1,
    )
  config.eval.batch_size = 512
  return config
