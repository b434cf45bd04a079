"""float_model: built-in architectures, user models, weights, and errors for models the pipeline cannot take."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tidlq.core import files
from tidlq.core.errors import UserError
from tidlq.core.params import DataParams, FloatTrainParams, ModelParams
from tidlq.models import builtin, networks
from tidlq.stages.float_model import run
from tidlq.stages.prepare_data import run as prepare


@pytest.fixture(scope="module")
def digits16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("digits16")
    prepare(DataParams(image_size=16), out)
    return out


@pytest.mark.parametrize("name", ["mobilenet_v2_tiny", "resnet_tiny"])
def test_builtins_shapes_and_size(name: str) -> None:
    net = builtin.BUILTINS[name](num_classes=7, in_channels=3).eval()
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 7)
    assert 5_000 < sum(p.numel() for p in net.parameters()) < 100_000
    networks.check_model(net, [1, 3, 32, 32], 7, name)


def test_mobilenet_has_depthwise_relu6_and_residuals() -> None:
    net = builtin.MobileNetV2Tiny()
    kinds = [type(m).__name__ for m in net.modules()]
    assert "ReLU6" in kinds
    assert any(isinstance(m, torch.nn.Conv2d) and m.groups == m.in_channels > 1 for m in net.modules())
    assert sum(isinstance(m, builtin.InvertedResidual) and m.use_residual for m in net.modules()) >= 2


def test_training_learns_digits(tmp_path: Path, digits16: Path) -> None:
    facts = run(ModelParams(), FloatTrainParams(epochs=3), digits16, tmp_path)
    spec = files.read_json(tmp_path / "model.json")
    assert facts["trained"] and spec["trained"]
    assert spec["val_accuracy"] > 85.0
    assert spec["history"][-1]["loss"] < spec["history"][0]["loss"]
    reloaded = networks.load(tmp_path)
    x = torch.from_numpy(np.load(digits16 / "dataset.npz")["x_val"][:4])
    assert reloaded(x).shape == (4, 10)


def test_training_is_deterministic(tmp_path: Path, digits16: Path) -> None:
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        run(ModelParams(source="tests.fixture_models:tiny"), FloatTrainParams(epochs=1), digits16, tmp_path / name)
    assert files.sha256_file(tmp_path / "a" / "float.pt") == files.sha256_file(tmp_path / "b" / "float.pt")


def test_user_model_with_weights_is_loaded_not_trained(tmp_path: Path, digits16: Path) -> None:
    from tests.fixture_models import Tiny

    torch.manual_seed(3)
    reference = Tiny()
    torch.save(reference.state_dict(), tmp_path / "w.pt")
    out = tmp_path / "out"
    out.mkdir()
    run(ModelParams(source="tests.fixture_models:tiny", weights=str(tmp_path / "w.pt")), FloatTrainParams(),
        digits16, out)
    assert files.read_json(out / "model.json")["trained"] is False
    loaded = torch.load(out / "float.pt", weights_only=True)
    assert all(torch.equal(loaded[k], v) for k, v in reference.state_dict().items())


@pytest.mark.parametrize(("source", "message"), [
    ("tests.fixture_models:branchy", "cannot be traced by torch.fx in submodule 'gate' at fixture_models.py"),
    ("tests.fixture_models:tuple_out", "returns a tuple"),
    ("tests.fixture_models:flat_mlp", "rejects an input of shape (1, 1, 16, 16)"),
    ("tests.fixture_models:not_a_module", "not a torch.nn.Module"),
    ("tests.fixture_models:nothing_here", "has no callable 'nothing_here'"),
    ("no_such_package.models:net", "module 'no_such_package.models' cannot be imported"),
])
def test_models_the_pipeline_cannot_take(tmp_path: Path, digits16: Path, source: str, message: str) -> None:
    with pytest.raises(UserError) as err:
        run(ModelParams(source=source), FloatTrainParams(epochs=1), digits16, tmp_path)
    assert message in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_wrong_number_of_classes(tmp_path: Path, digits16: Path) -> None:
    with pytest.raises(UserError, match=r"returns shape \(1, 4\) but the data has 10 classes"):
        run(ModelParams(source="tests.fixture_models:tiny", kwargs={"num_classes": 4}), FloatTrainParams(epochs=1),
            digits16, tmp_path)


@pytest.mark.parametrize(("make", "message"), [
    (lambda p: None, "does not exist"),
    (lambda p: p.write_bytes(b"\x80\x02garbage"), "cannot be loaded as a tensor-only state_dict"),
    (lambda p: p.write_bytes(torch.save(torch.nn.Linear(2, 2).state_dict(), p) or p.read_bytes()[:100]),
     "cannot be loaded"),
    (lambda p: torch.save([torch.zeros(1)], p), "is not a state_dict"),
    (lambda p: torch.save(torch.nn.Linear(2, 2).state_dict(), p), "missing keys conv1.0.bias, conv1.0.weight"),
    (lambda p: torch.save({k: v[..., :1] if v.ndim == 4 else v for k, v in __import__(
        "tests.fixture_models").fixture_models.Tiny().state_dict().items()}, p), "shape mismatch conv1.0.weight"),
])
def test_bad_weights(tmp_path: Path, make, message: str) -> None:
    from tests.fixture_models import Tiny

    path = tmp_path / "w.pt"
    make(path)
    with pytest.raises(UserError) as err:
        networks.load_weights(Tiny(), path)
    assert message in str(err.value)
    assert "model.weights" in str(err.value)


def test_weights_file_with_code_is_refused_not_executed(tmp_path: Path) -> None:
    import pickle

    class Boom:
        def __reduce__(self):  # noqa: ANN204
            return (Path(tmp_path / "pwned").touch, ())

    (tmp_path / "w.pt").write_bytes(pickle.dumps({"weight": Boom()}))
    with pytest.raises(UserError, match="tensor-only"):
        networks.load_weights(torch.nn.Linear(1, 1), tmp_path / "w.pt")
    assert not (tmp_path / "pwned").exists()
