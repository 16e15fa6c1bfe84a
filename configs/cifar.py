"""CIFAR-10 through TFDS: ResNet-20 teacher -> the guide's depthwise-separable student.

    python launch.py --config=configs/cifar.py --workdir=/tmp/kd-cifar
    python launch.py --config=configs/cifar.py --workdir=W \
        --config.data.source=folder --config.data.dir=/path/to/tree
"""

from configs import default


def get_config(arg: str = ""):
  """Nesterov SGD with warm-up and cosine decay for both stages; `budget`: 15 + 15 epochs."""
  config = default.get_config()
  config.data.source = "tfds"
  config.data.name = "cifar10"
  config.teacher.model = "resnet20"
  config.teacher.epochs = 60
  config.teacher.batch_size = 128
  config.teacher.optimizer = default.optimizer_config(
      name="sgd",
      learning_rate=0.1,
      momentum=0.9,
      nesterov=True,
      weight_decay=5e-4,
      warmup_epochs=1,
      grad_clip_norm=0.0,
  )
  config.student.epochs = 60
  config.student.batch_size = 128
  config.student.optimizer = default.optimizer_config(
      name="sgd",
      learning_rate=0.1,
      momentum=0.9,
      nesterov=True,
      weight_decay=5e-4,
      warmup_epochs=2,
      grad_clip_norm=0.0,
  )
  config.distill.temperature = 4.0
  config.distill.alpha = 0.9
  if arg == "budget":  # a CPU-sized run
    config.teacher.epochs = config.student.epochs = 15
  elif arg:
    raise ValueError(f"unknown variant {arg!r} of configs/cifar.py; use 'budget' or none")
  return config
