"""CIFAR-10 through TFDS: ResNet-20 teacher -> the depthwise-separable student.

    python launch.py --config=configs/cifar.py --workdir=/tmp/kd-cifar
    python launch.py --config=configs/cifar.py --workdir=W \
        --config.data.source=folder --config.data.dir=/path/to/tree
"""

from configs import default


def _nesterov_sgd(warmup_epochs: float):
  """Nesterov SGD at 0.1 for batch 128, weight decay 5e-4, warm-up then cosine, no clipping."""
  return default.optimizer_config(
      name="sgd",
      learning_rate=0.1,
      momentum=0.9,
      nesterov=True,
      weight_decay=5e-4,
      warmup_epochs=warmup_epochs,
      grad_clip_norm=0.0,
  )


def get_config(arg: str = ""):
  """The recipe bench/cifar_quality.py's sweep found; `budget`: 15 + 15 epochs."""
  config = default.get_config()
  config.data.source = "tfds"
  config.data.name = "cifar10"
  config.teacher.model = "resnet20"
  config.teacher.epochs = 60
  config.teacher.batch_size = 128
  config.teacher.optimizer = _nesterov_sgd(warmup_epochs=1)
  config.student.epochs = 60
  config.student.batch_size = 128
  config.student.optimizer = _nesterov_sgd(warmup_epochs=2)
  config.distill.temperature = 4.0
  config.distill.alpha = 0.9
  if arg == "budget":  # a CPU-sized run
    config.teacher.epochs = config.student.epochs = 15
  elif arg:
    raise ValueError(f"unknown variant {arg!r} of configs/cifar.py; use 'budget' or none")
  return config
