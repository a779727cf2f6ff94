import pytest
import torch

from fedtier.config import from_dict
from fedtier.errors import ConfigError
from fedtier.upload import UploadContext, build_chain, clip_norm, named_chain

CTX = UploadContext(round=0, edge=0, clients=[0, 1, 2], num_samples=torch.ones(3), seed=0)


def test_empty_chain_is_identity():
    d = torch.randn(3, 5)
    out, metrics = named_chain()(d, CTX)
    assert torch.equal(out, d) and metrics == {}


def test_clip_bounds_each_row_and_reports_under_its_name():
    d = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]])
    out, metrics = named_chain(("clip", clip_norm(1.0)))(d, CTX)
    torch.testing.assert_close(out.norm(dim=1), torch.tensor([1.0, 0.5, 0.0]))
    assert metrics["clip/clipped"] == 1.0


def test_stages_apply_in_order():
    d = torch.tensor([[30.0, 40.0]])
    out, _ = named_chain(("a", clip_norm(10.0)), ("b", clip_norm(1.0)))(d, CTX)
    torch.testing.assert_close(out.norm(dim=1), torch.tensor([1.0]))


def test_build_chain_from_config_and_errors():
    chain = build_chain(from_dict({"upload": [{"name": "clip", "max_norm": 2.0}]}).upload)
    assert [n for n, _ in chain.stages] == ["clip"]
    d = torch.tensor([[3.0, 4.0]])
    torch.testing.assert_close(chain(d, CTX)[0], torch.tensor([[1.2, 1.6]]))
    with pytest.raises(ConfigError, match=r"upload\[0\]\.name.*did you mean 'clip'"):
        from_dict({"upload": [{"name": "clipp"}]})
    with pytest.raises(
        ConfigError, match=r"upload\[0\]\.max_nrm.*did you mean 'upload\[0\]\.max_norm'"
    ):
        from_dict({"upload": [{"name": "clip", "max_nrm": 2.0}]})
    with pytest.raises(ConfigError, match=r"upload\[0\]\.max_norm.*positive number"):
        from_dict({"upload": [{"name": "clip", "max_norm": -1}]})
    with pytest.raises(ConfigError, match=r"upload\[0\]\.max_norm.*required"):
        from_dict({"upload": ["clip"]})
