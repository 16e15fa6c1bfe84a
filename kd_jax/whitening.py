"""Fitting a network's whitening layers (`layers.PatchWhitening`) to its training data.

airbench's first layer whitens the normalised images' patches: its filters come
from the second moment of every patch of the training split, measured here
before the stage trains, as the normalisation statistics are before any stage.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kd_jax import layers, parallel
from kd_jax.data import augment as augment_lib
from kd_jax.data.placement import TrainingData
from kd_jax.network import Network, Variables


def patch_moment(data: TrainingData, patch: int, mesh, batch_size: int) -> np.ndarray:
  """The uncentred second moment (D x D, D = patch^2 C) of the normalised training patches.

  Each image gives the mean of its windows' outer products (`layers.image_patches`),
  on the devices; they are averaged over the whole training split, which every image
  weighs equally in, as every image has the same number of windows.
  """

  def moments(variables, images_BxHxWxC):
    del variables  # a statistic of the data alone
    x = augment_lib.normalize(images_BxHxWxC, data.mean_C, data.std_C)
    patches_BxNxD = layers.image_patches(x, patch)
    return jnp.einsum("bnd,bne->bde", patches_BxNxD, patches_BxNxD) / patches_BxNxD.shape[1]

  forward = parallel.in_order(jax.jit(moments, out_shardings=parallel.replicated(mesh)))
  per_image_NxDxD, _ = data.predict(forward, None, "train", batch_size)
  return per_image_NxDxD.astype(np.float64).mean(axis=0)


def fit(network: Network, variables: Variables, data: TrainingData, mesh, batch_size: int):
  """`variables` with every whitening layer of `network` fitted to `data`'s training images.

  The layers must be where they see the normalised images (a network's first layer).
  A network without one gets its `variables` back, and the data is not read.
  """
  model = nnx.merge(network.train_graph, variables.params, variables.batch_stats, copy=True)
  whitenings = [m for _, m in nnx.iter_modules(model) if isinstance(m, layers.PatchWhitening)]
  if not whitenings:
    return variables
  for whitening in whitenings:
    whitening.fit(patch_moment(data, whitening.patch, mesh, batch_size))
  _, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  return Variables(params, batch_stats)
