import pytest

from fedtier.config import Config, from_dict, load_config
from fedtier.errors import ConfigError, FedtierError, UnknownNameError
from fedtier.presets import preset_names


def test_defaults_validate():
    assert isinstance(from_dict({}), Config)


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_loads_and_resolves_its_arms(name):
    cfg = load_config(name)
    assert cfg.arm_configs()


@pytest.mark.parametrize(
    "d, field, fragment",
    [
        ({"train": {"rounds": 0}}, "train.rounds", "positive integer"),
        ({"train": {"rounds": "ten"}}, "train.rounds", "an integer"),
        ({"train": {"lr": -1}}, "train.lr", "positive"),
        ({"train": {"momentum": 1.5}}, "train.momentum", "[0, 1)"),
        ({"quant": {"quantizer": "int3"}}, "quant.quantizer", "'paper'"),
        ({"quant": {"eval_bits": [32, 1]}}, "quant.eval_bits", "2 to 32"),
        ({"quant": {"qat": "yes"}}, "quant.qat", "true or false"),
        ({"topology": {"clients": 1, "edges": 2}}, "topology.clients", "at least"),
        ({"topology": {"clients_per_edge": 2.5}}, "topology.clients_per_edge", "whole count"),
        ({"topology": {"edges_per_round": 3}}, "topology.edges_per_round", "at most"),
        ({"topology": {"device_mix": {"toaster": 1.0}}}, "topology.device_mix", "device classes"),
        ({"data": {"partition": "random"}}, "data.partition", "'dirichlet'"),
        ({"aggregate": {"rule": "avg"}}, "aggregate.rule", "'qafed'"),
        ({"aggregate": {"edge_rule": "medain"}}, "aggregate.edge_rule", "'mean'"),
        ({"train": {"epoch": 3}}, "train.epoch", "did you mean 'train.epochs'"),
        ({"trian": {}}, "trian", "known fields"),
        ({"arms": {"a": {"train.lr": 0}}}, "train.lr", "positive"),
    ],
)
def test_bad_values_name_field_value_and_allowed(d, field, fragment):
    with pytest.raises(ConfigError) as e:
        from_dict(d).arm_configs()
    assert e.value.field == field
    assert fragment in str(e.value)


def test_arms_override_only_their_keys():
    cfg = from_dict({"train": {"rounds": 7}, "arms": {"a": {"quant.qat": True}, "b": {}}})
    arms = cfg.arm_configs()
    assert arms["a"].quant.qat and not arms["b"].quant.qat
    assert arms["a"].train.rounds == arms["b"].train.rounds == 7


def test_set_overrides_are_parsed_as_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train: {rounds: 3}\n")
    cfg = load_config(str(p), ["train.rounds=5", "quant.bits=[8, 4]", "train.device=cpu"])
    assert cfg.train.rounds == 5 and cfg.quant.bits == [8, 4]


def test_unknown_preset_lists_known():
    with pytest.raises(UnknownNameError, match="qafed-mnist"):
        load_config("qafed-mnst")


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(FedtierError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(FedtierError, match="not valid YAML"):
        load_config(str(bad))
    with pytest.raises(FedtierError, match="dotted.key=value"):
        load_config("qafed-mnist", ["train.rounds"])
