"""CIFAR-100, resnet32x4 -> resnet8x4 with the published recipe (CRD, Tian et al. 2020).

T = 4, CE weight 0.1, KD weight 0.9; SGD momentum 0.9, lr 0.05 x0.1 at epochs
150/180/210, 240 epochs, batch 64, weight decay 5e-4.
"""

from configs import default


def get_config():
  """The published KD recipe for resnet32x4 -> resnet8x4."""
  config = default.get_config()
  config.data.source = "tfds"
  config.data.name = "cifar100"
  sgd = dict(
      name="sgd",
      learning_rate=0.05,
      momentum=0.9,
      weight_decay=5e-4,
      schedule="step",
      decay_epochs=(150, 180, 210),
      decay_factor=0.1,
      grad_clip_norm=0.0,
  )
  config.teacher.model = "resnet32x4"
  config.teacher.epochs = 240
  config.teacher.batch_size = 64
  config.teacher.optimizer = default.optimizer_config(**sgd)
  config.student.model = "resnet8x4"
  config.student.epochs = 240
  config.student.batch_size = 64
  config.student.optimizer = default.optimizer_config(**sgd)
  config.distill.temperature = 4.0
  config.distill.alpha = 0.9
  return config
