"""The model registry: every model builds and runs, parameter counts, options, import paths, errors."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from fedtier.errors import ConfigError, FedtierError, UnknownNameError
from fedtier.models import build_model, count_parameters, known_models, register

MNIST = (1, 28, 28)
DIGITS = (1, 8, 8)
CIFAR = (3, 32, 32)
HEAVY = ("alexnet", "resnet18", "vgg16")
LIGHT = (
    "autoencoder",
    "cnn",
    "cnn-bn",
    "dcgan-discriminator",
    "dcgan-generator",
    "denoiser-mlp",
    "mlp",
    "unet",
)
SAME_SHAPE = (
    "autoencoder",
    "dcgan-generator",
    "denoiser-mlp",
    "unet",
)  # output shaped like the input


def _output(name: str, shape: tuple[int, int, int], classes: int = 10) -> torch.Tensor:
    torch.manual_seed(0)
    model = build_model(name, shape, classes)
    with torch.no_grad():
        if name in ("denoiser-mlp", "unet"):  # model(x_t, t)
            return model(torch.randn(2, *shape), torch.tensor([0, 57]))
        if name == "dcgan-generator":  # model(z), z [B, z_dim]
            return model(torch.randn(2, 64))
        return model(torch.randn(2, *shape))


def _expected(name: str, shape: tuple[int, int, int], classes: int = 10) -> tuple[int, ...]:
    if name == "dcgan-discriminator":  # one logit, whatever num_classes says
        return (2, 1)
    return (2, *shape) if name in SAME_SHAPE else (2, classes)


def test_known_models_are_the_documented_zoo() -> None:
    assert known_models() == sorted(HEAVY + LIGHT)


@pytest.mark.parametrize("name", known_models())
def test_every_model_runs_on_mnist_shape(name: str) -> None:
    assert tuple(_output(name, MNIST).shape) == _expected(name, MNIST)


@pytest.mark.parametrize("name", LIGHT)
@pytest.mark.parametrize("shape", [DIGITS, CIFAR])
def test_light_models_run_on_other_shapes(name: str, shape: tuple[int, int, int]) -> None:
    assert tuple(_output(name, shape, classes=3).shape) == _expected(name, shape, classes=3)


@pytest.mark.parametrize("name", HEAVY)
def test_paper_cifar_models_run_on_cifar_shape(name: str) -> None:
    assert tuple(_output(name, CIFAR).shape) == (2, 10)


@pytest.mark.parametrize(
    ("name", "shape", "count"),
    [
        ("cnn", MNIST, 215_370),
        ("mlp", MNIST, 79_510),
        # 64·6272+6272 + 2·6272 + 128·64·16+64 + 2·64 + 64·16+1
        ("dcgan-generator", MNIST, 552_513),
        # 1·64·16+64 + 64·128·16+128 + 128·7·7+1
        ("dcgan-discriminator", MNIST, 138_561),
        ("resnet18", CIFAR, 11_173_962),
        ("vgg16", CIFAR, 14_728_266),
    ],
)
def test_parameter_counts(name: str, shape: tuple[int, int, int], count: int) -> None:
    assert count_parameters(build_model(name, shape, 10)) == count


def _batchnorms(model: nn.Module) -> list[type]:
    return [type(m) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def test_cnn_bn_has_batchnorm_and_cnn_has_none() -> None:
    assert _batchnorms(build_model("cnn", MNIST, 10)) == []
    assert _batchnorms(build_model("cnn-bn", MNIST, 10)) == [
        nn.BatchNorm2d,
        nn.BatchNorm2d,
        nn.BatchNorm1d,
    ]


def test_cnn_options_scale_channels_and_hidden_width() -> None:
    model = build_model("cnn", MNIST, 10, width=2, hidden=64)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [c.out_channels for c in convs] == [32, 64]
    assert (linears[0].in_features, linears[0].out_features) == (64 * 7 * 7, 64)


def test_mlp_hidden_and_layers() -> None:
    def widths(model: nn.Module) -> list[int]:
        return [m.out_features for m in model.modules() if isinstance(m, nn.Linear)]

    assert widths(build_model("mlp", MNIST, 10)) == [100, 10]
    assert widths(build_model("mlp", MNIST, 10, hidden=50)) == [50, 10]
    assert widths(build_model("mlp", MNIST, 10, layers=[200, 200])) == [200, 200, 10]
    assert widths(build_model("mlp", MNIST, 10, layers=[])) == [10]


def test_autoencoder_latent_size() -> None:
    model = build_model("autoencoder", MNIST, 10, latent=8)
    assert model.encode(torch.randn(2, *MNIST)).shape == (2, 8)


@pytest.mark.parametrize("name", [*LIGHT, "resnet18"])
def test_same_seed_gives_same_weights(name: str) -> None:
    states = []
    for _ in range(2):
        torch.manual_seed(7)
        states.append(build_model(name, MNIST, 10).state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    torch.manual_seed(8)
    other = build_model(name, MNIST, 10).state_dict()
    assert not all(torch.equal(states[0][k], other[k]) for k in other)


def _write_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, source: str) -> None:
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))


USER_MODULE = """
    from torch import nn

    def with_data(input_shape, num_classes, scale=1):
        c, h, w = input_shape
        return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, num_classes * scale))

    def without_data(size=4):
        return nn.Linear(size, 2)

    def not_a_model(input_shape, num_classes):
        return "oops"

    CONSTANT = 3
"""


def test_import_path_model_receives_data_arguments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_module(tmp_path, monkeypatch, "user_models_a", USER_MODULE)
    model = build_model("user_models_a:with_data", MNIST, 10, scale=2)
    assert model(torch.randn(2, *MNIST)).shape == (2, 20)


def test_import_path_model_without_data_arguments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_module(tmp_path, monkeypatch, "user_models_b", USER_MODULE)
    model = build_model("user_models_b:without_data", MNIST, 10, size=6)
    assert isinstance(model, nn.Linear) and model.in_features == 6


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("user_models_c:missing", "has no attribute 'missing'"),
        ("user_models_c:not_a_model", "returned str, not a torch.nn.Module"),
        ("user_models_c:CONSTANT", "not a callable factory"),
        ("user_models_c:", "package.module:factory"),
        ("no_such_package_xyz.models:make", "cannot import module 'no_such_package_xyz.models'"),
        ("user_models_broken:make", "ZeroDivisionError"),
    ],
)
def test_bad_import_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, path: str, reason: str
) -> None:
    _write_module(tmp_path, monkeypatch, "user_models_c", USER_MODULE)
    _write_module(tmp_path, monkeypatch, "user_models_broken", "1 / 0\n")
    with pytest.raises(FedtierError, match=reason) as info:
        build_model(path, MNIST, 10)
    assert path in str(info.value)


def test_import_path_model_rejects_unknown_option(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_module(tmp_path, monkeypatch, "user_models_d", USER_MODULE)
    with pytest.raises(ConfigError, match="model.depth.*scale"):
        build_model("user_models_d:with_data", MNIST, 10, depth=3)


def test_unknown_name_lists_known_models() -> None:
    with pytest.raises(UnknownNameError) as info:
        build_model("cnn-b", MNIST, 10)
    message = str(info.value)
    assert all(name in message for name in known_models())
    assert "Did you mean 'cnn-bn'?" in message


@pytest.mark.parametrize(
    ("name", "options", "field", "allowed"),
    [
        ("cnn", {"depth": 3}, "model.depth", "hidden, width"),
        ("resnet18", {"width": 2}, "model.width", "none"),
        ("cnn", {"num_classes": 3}, "model.num_classes", "hidden, width"),
    ],
)
def test_unknown_option(name: str, options: dict[str, object], field: str, allowed: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_model(name, MNIST, 10, **options)
    assert info.value.field == field
    assert f"options of model '{name}': {allowed}" in str(info.value)


@pytest.mark.parametrize(
    ("name", "options", "field"),
    [
        ("cnn", {"width": 0}, "model.width"),
        ("cnn-bn", {"hidden": True}, "model.hidden"),
        ("mlp", {"hidden": -1}, "model.hidden"),
        ("mlp", {"layers": [10, 0]}, "model.layers"),
        ("mlp", {"layers": [10], "hidden": 5}, "model.layers"),
        ("alexnet", {"dropout": 1.5}, "model.dropout"),
        ("autoencoder", {"latent": 2.5}, "model.latent"),
    ],
)
def test_bad_option_value(name: str, options: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_model(name, MNIST, 10, **options)
    assert info.value.field == field


@pytest.mark.parametrize(
    ("name", "shape", "classes", "field"),
    [
        ("mlp", (28, 28), 10, "input_shape"),
        ("mlp", MNIST, 0, "num_classes"),
        ("cnn", (1, 3, 3), 10, "input_shape"),
    ],
)
def test_bad_data_arguments(name: str, shape: tuple[int, ...], classes: int, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_model(name, shape, classes)
    assert info.value.field == field


def test_input_shape_may_be_a_list() -> None:
    assert build_model("mlp", [1, 8, 8], 4)(torch.randn(2, 1, 8, 8)).shape == (2, 4)


def test_register_rejects_a_taken_name() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register("cnn")(lambda input_shape, num_classes: nn.Identity())


def test_dcgan_generator_outputs_images_in_tanh_range_and_options() -> None:
    torch.manual_seed(0)
    model = build_model("dcgan-generator", MNIST, 10, z_dim=16, width=8)
    images = model(torch.randn(5, 16) * 10)
    assert images.shape == (5, *MNIST)
    assert images.abs().max() <= 1.0 and images.abs().max() > 0.9  # saturated tanh
    assert _batchnorms(model) == [nn.BatchNorm1d, nn.BatchNorm2d]
    assert _batchnorms(build_model("dcgan-generator", MNIST, 10, batchnorm=False)) == []


def test_dcgan_discriminator_has_no_batchnorm_and_is_per_sample() -> None:
    torch.manual_seed(0)
    model = build_model("dcgan-discriminator", MNIST, 10, width=8)
    assert _batchnorms(model) == []
    batch = torch.randn(6, *MNIST)
    # no batch statistics: a sample's logit does not depend on the rest of its batch
    torch.testing.assert_close(model(batch)[:2], model(batch[:2]))


@pytest.mark.parametrize(
    ("name", "options", "field"),
    [
        ("dcgan-generator", {"z_dim": 0}, "model.z_dim"),
        ("dcgan-generator", {"width": -1}, "model.width"),
        ("dcgan-generator", {"batchnorm": "yes"}, "model.batchnorm"),
        ("dcgan-discriminator", {"width": 0}, "model.width"),
    ],
)
def test_dcgan_bad_options(name: str, options: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        build_model(name, MNIST, 10, **options)


def test_dcgan_generator_needs_sides_divisible_by_4() -> None:
    with pytest.raises(ConfigError, match="divisible by 4"):
        build_model("dcgan-generator", (1, 30, 30), 10)
