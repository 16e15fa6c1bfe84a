"""CIFAR-100 with the published recipes of the KD tables (CRD, DKD, logit standardisation).

    python launch.py --config=configs/cifar100.py --workdir=W                  # resnet32x4 -> resnet8x4, KD
    python launch.py --config=configs/cifar100.py:resnet56-resnet20,dkd --workdir=W
    python launch.py --config=configs/cifar100.py:wrn_40_2-wrn_16_2,kd_ls --workdir=W

The argument is "TEACHER-STUDENT,METHOD" with the pairs below and METHOD one of
kd (T 4, CE 0.1 + KD 0.9), dkd (T 4, CE 1, alpha 1, beta per pair, 20 warm-up
epochs), kd_ls (logit standardisation: T 2, CE 1 + KD 9), or the feature methods
fitnet (CE + 100 hint MSE), at (CE + 1000 AT), crd (CE + 0.8 NCE) and reviewkd
(CE + HCL, weight per pair, 20 warm-up epochs). All train 240
epochs with SGD momentum 0.9, lr 0.05 x0.1 at epochs 150/180/210, batch 64,
weight decay 5e-4; the teacher is trained by kd_jax first, as pre-trained
weights cannot be downloaded here.
"""

from configs import default

# Per pair: DKD's beta (mdistiller's configs/cifar100/dkd/*.yaml) and ReviewKD's weight
# (ReviewKD's CIFAR-100 scripts).
PAIRS = {
    "resnet32x4-resnet8x4": dict(dkd_beta=8.0, reviewkd_weight=5.0),
    "resnet56-resnet20": dict(dkd_beta=2.0, reviewkd_weight=0.6),
    "wrn_40_2-wrn_16_2": dict(dkd_beta=6.0, reviewkd_weight=5.0),
}
# The feature methods' other weights are configs/default.py's, RepDistiller's.
FEATURE_METHODS = ("fitnet", "at", "crd", "reviewkd")
METHODS = ("kd", "dkd", "kd_ls", *FEATURE_METHODS)


def get_config(spec: str = "resnet32x4-resnet8x4,kd"):
  """The recipe for "TEACHER-STUDENT,METHOD"."""
  pair, _, method = spec.partition(",")
  if pair not in PAIRS or method not in METHODS:
    raise ValueError(
        f"unknown config argument {spec!r}; use PAIR,METHOD with PAIR one of "
        f"{', '.join(PAIRS)} and METHOD one of {', '.join(METHODS)}"
    )
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
  config.teacher.model, config.student.model = pair.split("-")
  for stage in (config.teacher, config.student):
    stage.epochs = 240
    stage.batch_size = 64
    stage.optimizer = default.optimizer_config(**sgd)
  distill = config.distill
  if method == "kd":
    distill.update(method="kd", temperature=4.0, alpha=0.9)
  elif method == "dkd":
    distill.update(
        method="dkd",
        temperature=4.0,
        dkd_alpha=1.0,
        dkd_beta=PAIRS[pair]["dkd_beta"],
        dkd_ce_weight=1.0,
        dkd_warmup_epochs=20,
    )
  elif method == "kd_ls":
    # CE 1 + KD 9 on standardised logits: alpha 0.9, the whole loss x10.
    distill.update(
        method="kd", temperature=2.0, alpha=0.9, loss_scale=10.0, logit_standardization=True
    )
  else:  # a feature method
    distill.method = method
    if method == "reviewkd":
      distill.reviewkd_weight = PAIRS[pair]["reviewkd_weight"]
  return config
