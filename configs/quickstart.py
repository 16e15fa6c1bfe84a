"""A minute on a laptop CPU, no download: scikit-learn's 8x8 handwritten digits.

python launch.py --config=configs/quickstart.py --workdir=/tmp/kd
"""

from configs import default


def get_config():
  """ResNet-8 teacher -> half-width depthwise-separable student on digits."""
  config = default.get_config()
  config.data.source = "digits"
  config.data.augment = "none"  # flipped or shifted digits are other digits
  config.teacher.model = "resnet8"
  config.teacher.epochs = 15
  config.teacher.batch_size = 64
  config.teacher.optimizer = default.optimizer_config(learning_rate=1e-2, warmup_epochs=1)
  config.student.width_multiplier = 0.5
  config.student.epochs = 40
  config.student.batch_size = 64
  config.student.optimizer = default.optimizer_config(learning_rate=1e-2, warmup_epochs=1)
  config.distill.temperature = 4.0
  config.distill.alpha = 0.7
  config.eval.latency_repeats = 20
  config.eval.throughput_repeats = 5
  return config
