"""Model zoo: ``build_model(name, input_shape, num_classes, **options)``.

Registered: ``cnn`` and ``cnn-bn`` (FedAvg MNIST CNN), ``mlp``, ``autoencoder``,
``denoiser-mlp`` and ``unet`` (diffusers' UNet2DModel; ε̂ = model(x_t, t), for diffusion tasks),
``dcgan-generator`` (z [B, z_dim] → images) and ``dcgan-discriminator`` (images → one logit,
no BatchNorm), and the
QAFed CIFAR-10 models ``resnet18``, ``alexnet`` and ``vgg16``; any ``package.module:factory``
import path also works.
"""

from fedtier.models import (  # noqa: F401  (registers the models)
    alexnet,
    cnn,
    denoiser,
    gan,
    mlp,
    resnet,
    unet,
    vgg,
)
from fedtier.models.registry import Shape, build_model, count_parameters, known_models, register

__all__ = ["Shape", "build_model", "count_parameters", "known_models", "register"]
