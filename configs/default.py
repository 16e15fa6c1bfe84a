"""The guide's recipe: every field kd_jax reads, with the guide's hyper-parameters.

Other configs start from this one and override a few fields. Any field can be
overridden on the command line, e.g. --config.distill.temperature=4.
"""

import ml_collections


def optimizer_config(**overrides) -> ml_collections.ConfigDict:
  """A stage's optimiser: Adam at 1e-4 with cosine decay and clipping (the guide)."""
  config = ml_collections.ConfigDict(
      dict(
          name="adam",  # adam | adamw | sgd
          learning_rate=1e-4,  # peak learning rate for the global batch...
          reference_batch_size=0,  # ...or, if set, for this batch, scaled linearly to the global one
          momentum=0.9,  # sgd only
          nesterov=False,  # sgd only
          weight_decay=0.0,
          grad_clip_norm=1.0,  # global-norm clipping; 0 switches it off
          schedule="cosine",  # cosine | linear | step | constant
          warmup_epochs=0.0,  # cosine, linear: linear warm-up before the decay...
          start_lr_fraction=0.0,  # ...from this fraction of the peak
          end_lr_fraction=0.0,  # cosine, linear: final learning rate / peak
          decay_epochs=(),  # step: epochs at which the rate is multiplied...
          decay_factor=0.1,  # ...by this
          # sgd: batch-norm biases learn this many times faster, their decay per step
          # unchanged (airbench: 64)
          norm_bias_lr_multiplier=1.0,
          # every this many steps the weights become a moving average of themselves
          # (airbench's lookahead, 5; the average's weight rises as decay^steps * progress^3)
          # and each epoch, the last included, ends on the average; 0: off
          lookahead_steps=0,
          lookahead_decay=0.95,
          lookahead_start_epochs=0.0,  # the average starts after this many epochs (airbench: 3)
          # a whitening layer's bias trains this many epochs, then stays (airbench: 3); 0: always
          whitening_bias_epochs=0.0,
      )
  )
  config.update(overrides)
  return config


def get_config() -> ml_collections.ConfigDict:
  """The default configuration."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.seeds = 1  # student and baseline runs, with seeds seed, seed + 1, ...
  # auto: bfloat16 compute on GPU/TPU, float32 on CPU; weights stay float32 either way
  config.compute_dtype = "auto"  # auto | float32 | bfloat16

  config.data = ml_collections.ConfigDict(
      dict(
          source="tfds",  # tfds | folder | digits
          name="cifar10",  # TFDS dataset name (source=tfds)
          dir="",  # root of an image folder: <train_split>/ and <test_split>/ (source=folder)
          image_size=0,  # resize to this square size; 0 keeps the data's own
          train_split="train",  # TFDS split, or (source=folder) the training folder...
          test_split="test",  # ...and the test folder's (ImageNet's: val)
          # per-channel normalisation on the 0..1 scale, e.g. ImageNet's (0.485, 0.456, 0.406)
          # and (0.229, 0.224, 0.225) for pretrained weights; () computes them from the
          # training split
          mean=(),
          std=(),
          download=True,  # may TFDS download the dataset if it is not prepared?
          tfds_data_dir="",  # where TFDS keeps prepared data; "" is its default
          # crop_flip (pad-4 crop + flip) | translate_flip (airbench: reflect-pad-2 crop + flip)
          # | resized_crop_flip (ImageNet) | none
          augment="crop_flip",
          # true: decode everything into memory first | false: stream from disk as training
          # goes (folder, or tfds prepared as array_record) | auto: stream when the decoded
          # images of one process's share exceed memory_budget_gb
          in_memory="auto",
          memory_budget_gb=16.0,
          workers=0,  # streaming: decoding threads per process; 0 = one per CPU core
          prefetch=2,  # streaming: batches in flight to the devices
          stats_images=50000,  # streaming: images sampled for the normalisation statistics
          # streaming: < 1 evaluates on the centre of test images whose shorter side is
          # resized to image_size / eval_crop (ImageNet: 0.875, i.e. 256 -> 224); 1 resizes whole
          eval_crop=1.0,
          # source=folder: logits from another tool, dir/train/<class>/<image>.npy per
          # training image (offline distillation with no kd_jax teacher)
          teacher_logits_dir="",
      )
  )

  config.teacher = ml_collections.ConfigDict(
      dict(
          model="resnet20",  # a registered name, or your factory: "package.module:function"
          checkpoint="",  # a kd_jax stage folder to restore the teacher from, not train it
          # a safetensors file of a torchvision state dict (resnet18/34/50, mobilenet_v2) to
          # start from; with epochs=0 the teacher is used as it is
          weights="",
          epochs=10,
          batch_size=64,
          label_smoothing=0.0,  # the teacher's cross-entropy target: 1 - s on the label, s spread
          optimizer=optimizer_config(),
      )
  )

  config.student = ml_collections.ConfigDict(
      dict(
          model="dsconv_student",  # as teacher.model
          width_multiplier=1.0,
          weights="",  # a safetensors file of a torchvision state dict to start from
          epochs=10,
          batch_size=64,
          optimizer=optimizer_config(),
      )
  )

  config.distill = ml_collections.ConfigDict(
      dict(
          method="kd",  # kd | dkd | at | fitnet | crd | reviewkd (the last four: online only)
          mode="online",  # online: teacher inside the step | offline: its stored logits
          cache_dtype="float16",  # offline: how the teacher's logits are stored
          cache="plain",  # offline: plain (unaugmented images) | consistent (the student's views)
          cache_top_k=0,  # offline: store only the k largest logits (+ the rest's mean); 0: all
          temperature=2.0,
          alpha=0.5,  # weight of the soft (KL) term; 1 - alpha weights CE
          temperature_schedule="constant",  # constant | linear | cosine
          temperature_start=5.0,  # linear/cosine: from this...
          temperature_end=1.0,  # ...to this over the run (the guide's 5 -> 1)
          logit_standardization=False,  # standardise logits in the soft term (Sun et al.)
          loss_scale=1.0,  # multiplies the whole objective
          dkd_alpha=1.0,  # dkd: weight of the target-class term (TCKD)...
          dkd_beta=8.0,  # ...and of the non-target-class term (NCKD)
          dkd_ce_weight=1.0,  # dkd: weight of cross-entropy
          dkd_warmup_epochs=20,  # dkd: the DKD term's weight rises linearly over these
          at_weight=1000.0,  # at: weight of attention transfer (CE weighs 1)
          fitnet_weight=100.0,  # fitnet: weight of the hint's MSE (CE weighs 1)
          crd_weight=0.8,  # crd: weight of the contrastive (NCE) loss (CE weighs 1)
          crd_negatives=16384,  # crd: negatives per example, drawn from the memory each step
          crd_with_kd=False,  # crd: kd's objective (alpha, temperature, ...) in place of CE
          reviewkd_weight=1.0,  # reviewkd: weight of the hierarchical context loss (CE weighs 1)
          reviewkd_warmup_epochs=20,  # reviewkd: its weight rises linearly over these
      )
  )

  # The same student, data, epochs and seed trained with labels only (alpha = 0),
  # so that the report measures what distillation gained.
  config.baseline = ml_collections.ConfigDict(dict(enabled=True))

  config.checkpoint = ml_collections.ConfigDict(
      dict(
          every_steps=500,  # also save every this many steps (0: only at epoch ends)
          keep=3,  # newest checkpoints kept per stage, plus the best by test top-1
          allow_config_change=False,  # resume a workdir written with a different config
      )
  )

  # The distilled student as model.jax (jax.export) and, where TensorFlow is installed,
  # a TF SavedModel, in <workdir>/export/student, for serving without kd_jax.
  config.export = ml_collections.ConfigDict(dict(enabled=True))

  config.eval = ml_collections.ConfigDict(
      dict(
          batch_size=256,  # evaluation and throughput batch
          # test accuracies average the logits of: none | flip (the image and its mirror) |
          # flip_translate (airbench94's six views); latency, throughput and export: one view
          tta="none",
          latency_repeats=50,  # batch-1 forward passes timed for latency
          throughput_repeats=10,  # batch_size forward passes timed for throughput
      )
  )
  return config
