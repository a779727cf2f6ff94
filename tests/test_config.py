import inspect
import json
import subprocess
import sys
from importlib import resources

import annotated_types
import jsonschema
import pytest
import yaml
from pydantic import BaseModel

from fedtier import config as C
from fedtier.config import Config, from_dict, load_config, schema, to_dict
from fedtier.errors import ConfigError, FedtierError, UnknownNameError
from fedtier.presets import load_preset_dict, preset_names


def test_defaults_validate():
    assert isinstance(from_dict({}), Config)


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_loads_resolves_and_round_trips(name):
    cfg = load_config(name)
    for c in [cfg, *cfg.arm_configs().values()]:
        # what RunWriter writes as config.yaml, read back
        text = yaml.safe_dump(to_dict(c), sort_keys=False)
        assert from_dict(yaml.safe_load(text)) == c


@pytest.mark.parametrize(
    "d, field, fragment",
    [
        ({"train": {"rounds": 0}}, "train.rounds", "a positive integer"),
        ({"train": {"rounds": "ten"}}, "train.rounds", "an integer"),
        ({"train": {"rounds": 2.0}}, "train.rounds", "an integer"),
        ({"train": {"lr": -1}}, "train.lr", "a positive number"),
        ({"train": {"momentum": 1.5}}, "train.momentum", "a number in [0, 1)"),
        ({"quant": {"quantizer": "int3"}}, "quant.quantizer", "'paper'"),
        ({"quant": {"eval_bits": [32, 1]}}, "quant.eval_bits[1]", "an integer from 2 to 32"),
        ({"quant": {"eval_bits": []}}, "quant.eval_bits", "non-empty"),
        ({"quant": {"qat": "yes"}}, "quant.qat", "true or false"),
        ({"topology": {"clients": 1, "edges": 2}}, "topology.clients", "at least"),
        ({"topology": {"clients_per_edge": 2.5}}, "topology.clients_per_edge", "whole count"),
        ({"topology": {"edges_per_round": 3}}, "topology.edges_per_round", "at most"),
        (
            {"topology": {"device_mix": {"smartfone": 1.0}}},
            "topology.device_mix",
            "did you mean 'smartphone'",
        ),
        ({"topology": {"device_mix": {"embedded": -1.0}}}, "topology.device_mix", "non-negative"),
        ({"data": {"partition": "random"}}, "data.partition", "'dirichlet'"),
        ({"aggregate": {"rule": "avg"}}, "aggregate.rule", "'qafed'"),
        ({"costs": {"allocation": "optimal"}}, "costs.deadline_s", "needed by this policy"),
        ({"costs": {"stragglers": "drop"}}, "costs.deadline_s", "needed by this policy"),
        ({"attack": {"kind": "fqbd", "malicious": 101}}, "attack.malicious", "count up to 100"),
        ({"attack": {"kind": "fqbd", "malicious": 2.5}}, "attack.malicious", "a fraction"),
        ({"attack": {"kind": "dba", "malicious_ids": [100]}}, "attack.malicious_ids", "[0, 99]"),
        ({"attack": {"kind": "fqma", "predict_k": 5}}, "attack.predict_k", "1..4"),
        ({"attack": {"kind": "fqbd", "bits": []}}, "attack.bits", "non-empty"),
        ({"attack": {"kind": "fqbd", "bits": [32]}}, "attack.bits[0]", "from 2 to 31"),
        ({"attack": {"kind": "fqbd", "gamma": 0}}, "attack.gamma", "a positive number or null"),
        (
            {"attack": {"kind": "fqbd"}, "trigger": {"position": "middle"}},
            "trigger.position",
            "'top-left'",
        ),
        (
            {"upload": [{"name": "dynamic", "min_bits": 6, "max_bits": 4}]},
            "upload[0].max_bits",
            "6..16",
        ),
        ({"upload": [{"name": "clip"}]}, "upload[0].max_norm", "required"),
        ({"upload": [{"name": "topk", "ratio": 1.5}]}, "upload[0].ratio", "a number in (0, 1]"),
        ({"aggregate": {"edge_rule": 3}}, "aggregate.edge_rule", "a bare name"),
        ({"attack": {"malicious": 0.1}}, "attack", "a mapping with 'kind'"),
        (
            {"defenses": [{"name": "qcheck"}, {"name": "qcheck", "ratio": 3}]},
            "defenses[1].name",
            "at most once",
        ),
        ({"arms": {"a": {"train.lr": 0}}}, "arms.a.train.lr", "a positive number"),
        ({"arms": {"k": {"aggregate.edge_rule.f": -1}}}, "arms.k.aggregate.edge_rule.f", ">= 0"),
        ({"arms": {"x": 3}}, "arms.x", "a mapping"),
        ({"train": {"optimizer": "adam", "momentum": 0.9}}, "train.momentum", "optimizer 'adam'"),
        ({"train": {"optimizer": "adamw"}}, "train.optimizer", "'adam'"),
    ],
)
def test_bad_values_name_field_value_and_allowed(d, field, fragment):
    if "arms" in d and "k" in d["arms"]:
        d = {**d, "aggregate": {"edge_rule": {"name": "krum", "f": 1}}}
    with pytest.raises(ConfigError) as e:
        from_dict(d).arm_configs()
    assert e.value.field == field
    assert fragment in str(e.value)
    assert "\n" not in str(e.value)  # one error, one line


def test_several_errors_are_listed_one_per_line():
    with pytest.raises(ConfigError) as e:
        from_dict({"train": {"rounds": 0, "lr": -1}, "eval": {"every": 0}})
    lines = str(e.value).splitlines()
    assert e.value.field == "train.rounds" and len(lines) == 3
    assert "config field 'train.lr': got -1" in lines[1] and "eval.every" in lines[2]


# --------------------------------------------------------------------------- declared bounds

# the ranges fedtier accepts, written out by hand (from the checks the hand-written parser of
# fedtier 0.1 made, and the papers' domains): (config, path, just outside, just inside)
BOUNDARIES = [
    ({"topology": {"edges": "V", "edges_per_round": 0.5}}, "topology.edges", 0, 1),
    ({"topology": {"edges_per_round": "V"}}, "topology.edges_per_round", 0.0, 1e-9),
    ({"train": {"momentum": "V"}}, "train.momentum", 1.0, 0.999),
    ({"train": {"weight_decay": "V"}}, "train.weight_decay", -1e-9, 0.0),
    ({"quant": {"bits": ["V"]}}, "quant.bits[0]", 1, 2),
    ({"quant": {"bits": ["V"]}}, "quant.bits[0]", 33, 32),
    ({"aggregate": {"server_lr": "V"}}, "aggregate.server_lr", 0.0, 1e-9),
    ({"aggregate": {"edge_rule": {"name": "krum", "m": "V"}}}, "aggregate.edge_rule.m", 0, 1),
    ({"aggregate": {"cloud_rule": {"name": "bulyan", "f": "V"}}}, "aggregate.cloud_rule.f", -1, 0),
    (
        {"aggregate": {"edge_rule": {"name": "dp-mean", "noise": "V"}}},
        "aggregate.edge_rule.noise",
        -1e-9,
        0.0,
    ),
    (
        {"aggregate": {"edge_rule": {"name": "dp-mean", "delta": "V"}}},
        "aggregate.edge_rule.delta",
        1.0,
        0.5,
    ),
    ({"upload": [{"name": "quantize", "levels": "V"}]}, "upload[0].levels", 1, 2),
    ({"upload": [{"name": "qsgd", "levels": "V"}]}, "upload[0].levels", 0, 1),
    ({"upload": [{"name": "topk", "ratio": "V"}]}, "upload[0].ratio", 1.0000001, 1.0),
    ({"upload": [{"name": "dynamic", "max_bits": "V"}]}, "upload[0].max_bits", 17, 16),
    ({"upload": [{"name": "ldp", "clip": "V"}]}, "upload[0].clip", 0.0, 1e-9),
    ({"attack": {"kind": "fqbd", "cell_margin": "V"}}, "attack.cell_margin", 0.5, 0.49),
    ({"attack": {"kind": "fqbd", "poison_fraction": "V"}}, "attack.poison_fraction", 0.0, 1.0),
    ({"attack": {"kind": "fqma", "momentum": "V"}}, "attack.momentum", 1.0, 0.0),
    ({"attack": {"kind": "hong-degrade", "alpha": "V"}}, "attack.alpha", -1e-9, 0.0),
    ({"attack": {"kind": "sign-flip", "scale": "V"}}, "attack.scale", 0.0, 1e-9),
    ({"attack": {"kind": "dba", "dba_parts": "V"}}, "attack.dba_parts", 0, 1),
    ({"defenses": [{"name": "global-clip", "rho_step": "V"}]}, "defenses[0].rho_step", -1e-9, 0.0),
    ({"schedule": {"mixing": "V"}}, "schedule.mixing", 1.0000001, 1.0),
    ({"schedule": {"staleness_exponent": "V"}}, "schedule.staleness_exponent", -1e-9, 0.0),
    ({"costs": {"resource_blocks": "V"}}, "costs.resource_blocks", -1, 0),
]


def _put(d, v):
    if d == "V":
        return v
    if isinstance(d, dict):
        return {k: _put(x, v) for k, x in d.items()}
    if isinstance(d, list):
        return [_put(x, v) for x in d]
    return d


@pytest.mark.parametrize("d, path, outside, inside", BOUNDARIES)
def test_hand_written_boundaries(d, path, outside, inside):
    with pytest.raises(ConfigError) as e:
        from_dict(_put(d, outside))
    assert e.value.field == path and e.value.value == outside
    from_dict(_put(d, inside))


def _bounds(meta):
    out = {}
    for m in meta:
        for c in getattr(m, "metadata", [m]):
            for kind in ("gt", "ge", "lt", "le"):
                if isinstance(c, getattr(annotated_types, kind.capitalize())):
                    out[kind] = getattr(c, kind)
    return out


def _placements():
    """(model, how to place a field value in a config, path prefix) for every section and
    every variant of every component."""

    def comp(union, key, path, listed):
        for name, cls in C.variant_names(union).items():
            tag = "kind" if "kind" in cls.model_fields else "name"
            required = {k: 1.0 for k, f in cls.model_fields.items() if f.is_required() and k != tag}

            def place(field, v, name=name, tag=tag, required=required, extra=None):
                item = {tag: name, **required, **(extra or {}), field: v}
                return {key: [item]} if listed else _nest(key, item)

            yield cls, place, path

    for section in (
        "data",
        "topology",
        "train",
        "quant",
        "aggregate",
        "eval",
        "costs",
        "schedule",
        "trigger",
    ):
        cls = Config.model_fields[section].annotation
        yield cls, (lambda f, v, s=section, extra=None: {s: {**(extra or {}), f: v}}), section
    yield Config, (lambda f, v, extra=None: {f: v}), ""
    yield from comp(C.RuleConfig, "aggregate.edge_rule", "aggregate.edge_rule", False)
    # dp-mean is refused at the cloud (central DP noises clients' updates at their edge)
    for case in comp(C.RuleConfig, "aggregate.cloud_rule", "aggregate.cloud_rule", False):
        if case[0] is not C.DpMeanRule:
            yield case
    yield from comp(C.StageConfig, "upload", "upload[0]", True)
    yield from comp(C.AttackConfig, "attack", "attack", False)
    yield from comp(C.DefenseConfig, "defenses", "defenses[0]", True)


def _nest(key, value):
    *head, last = key.split(".")
    d = out = {}
    for part in head:
        d[part] = {}
        d = d[part]
    d[last] = value
    return out


# cross-field rules that a value at a lone bound would trip; the context that avoids them
CONTEXT = {
    ("upload[0]", "max_bits"): {"min_bits": 1},
    ("topology", "edges"): {"edges_per_round": 0.5},
    ("topology", "clients"): {"edges": 1},
}


def _cases():
    for cls, place, path in _placements():
        for field, info in cls.model_fields.items():
            tp, meta, _ = C._strip(info.annotation)
            b = _bounds(info.metadata + meta)
            if not b or tp not in (int, float):
                continue
            step = 1 if tp is int else 1e-9
            pairs = []
            if "gt" in b:
                pairs.append((b["gt"], b["gt"] + step))
            if "ge" in b:
                pairs.append((b["ge"] - step, b["ge"]))
            if "lt" in b:
                pairs.append((b["lt"], b["lt"] - step))
            if "le" in b:
                pairs.append((b["le"] + step, b["le"]))
            for outside, inside in pairs:
                full = f"{path}.{field}".lstrip(".")
                yield pytest.param(place, field, full, outside, inside, id=f"{full}={outside}")


@pytest.mark.parametrize("place, field, full, outside, inside", list(_cases()))
def test_every_declared_bound_refuses_just_outside_and_accepts_just_inside(
    place, field, full, outside, inside
):
    ctx = CONTEXT.get((full.rsplit(".", 1)[0], field))
    with pytest.raises(ConfigError) as e:
        from_dict(place(field, outside, extra=ctx))
    assert e.value.field == full and e.value.value == outside
    cfg = from_dict(place(field, inside, extra=ctx))
    node = to_dict(cfg)
    for part in full.replace("[0]", ".0").split("."):
        node = node[int(part)] if part.isdigit() else node[part]
    assert node == inside


def test_bounds_sweep_covers_every_component_variant():
    cases = {c.values[2] for c in _cases()}
    for must in (
        "aggregate.edge_rule.f",
        "upload[0].levels",
        "attack.lam",
        "defenses[0].rho0",
        "upload[0].target_error",
        "attack.dba_parts",
        "schedule.mixing",
        "seed",
    ):
        assert must in cases


# --------------------------------------------------------------------------- names and keys


@pytest.mark.parametrize(
    "d, field, hint",
    [
        ({"train": {"epoch": 3}}, "train.epoch", "did you mean 'train.epochs'"),
        ({"trian": {}}, "trian", "did you mean 'train'"),
        (
            {"aggregate": {"edge_rule": {"name": "krum", "ff": 1}}},
            "aggregate.edge_rule.ff",
            "did you mean 'aggregate.edge_rule.f'",
        ),
        (
            {"upload": [{"name": "quantize", "level": 8}]},
            "upload[0].level",
            "did you mean 'upload[0].levels'",
        ),
        ({"attack": {"kind": "fqbd", "lamda": 2}}, "attack.lamda", "did you mean 'attack.lam'"),
        (
            {"defenses": [{"name": "qcheck", "sample": 5}]},
            "defenses[0].sample",
            "did you mean 'defenses[0].samples'",
        ),
        # a field of another variant: named as not one of this variant's fields
        (
            {"attack": {"kind": "hong-backdoor", "solver": "cells"}},
            "attack.solver",
            "'hong-backdoor'",
        ),
    ],
)
def test_unknown_keys_are_refused_with_did_you_mean(d, field, hint):
    with pytest.raises(ConfigError) as e:
        from_dict(d)
    assert e.value.field == field and hint in str(e.value)


@pytest.mark.parametrize(
    "d, field, hint",
    [
        ({"aggregate": {"edge_rule": "medain"}}, "aggregate.edge_rule.name", "'median'"),
        ({"aggregate": {"cloud_rule": {"name": "krumm"}}}, "aggregate.cloud_rule.name", "'krum'"),
        ({"upload": [{"name": "quantise"}]}, "upload[0].name", "'quantize'"),
        ({"attack": {"kind": "fqbdd"}}, "attack.kind", "'fqbd'"),
        ({"defenses": [{"name": "global_clip"}]}, "defenses[0].name", "'global-clip'"),
        ({"train": {"task": "autoencodr"}}, "train.task.name", "'autoencoder'"),
    ],
)
def test_unknown_component_names_are_refused_with_did_you_mean(d, field, hint):
    with pytest.raises(ConfigError) as e:
        from_dict(d)
    assert e.value.field == field
    assert f"did you mean {hint}" in str(e.value)


def test_a_bare_name_is_the_component_with_its_defaults():
    cfg = from_dict({"aggregate": {"edge_rule": "krum"}, "upload": ["fp32"], "attack": "fqbd"})
    assert cfg.aggregate.edge_rule == C.KrumRule(name="krum", f=1, m=1)
    assert cfg.upload == [C.Fp32Stage(name="fp32")]
    assert cfg.attack.kind == "fqbd" and cfg.attack.lam == 1.0


def test_config_is_frozen():
    cfg = from_dict({})
    with pytest.raises(Exception, match="frozen"):
        cfg.train.rounds = 3  # type: ignore[misc]


# --------------------------------------------------------------------------- arms


def test_arms_override_only_their_keys():
    cfg = from_dict({"train": {"rounds": 7}, "arms": {"a": {"quant.qat": True}, "b": {}}})
    arms = cfg.arm_configs()
    assert arms["a"].quant.qat and not arms["b"].quant.qat
    assert arms["a"].train.rounds == arms["b"].train.rounds == 7


def test_arms_replace_a_component_or_set_one_of_its_options():
    cfg = from_dict(
        {
            "aggregate": {"edge_rule": {"name": "krum", "f": 1, "m": 2}},
            "arms": {
                "f2": {"aggregate.edge_rule.f": 2},
                "median": {"aggregate.edge_rule": {"name": "median"}},
                "bare": {"aggregate.edge_rule": "trimmed-mean"},
                "renamed": {"aggregate.edge_rule.name": "multi-krum"},
            },
        }
    )
    arms = cfg.arm_configs()
    assert arms["f2"].aggregate.edge_rule == C.KrumRule(name="krum", f=2, m=2)
    assert arms["median"].aggregate.edge_rule == C.MedianRule(name="median", f=1)
    assert arms["bare"].aggregate.edge_rule == C.MedianRule(name="trimmed-mean", f=1)
    # switching the name keeps the options the new variant has too (f, m)
    assert arms["renamed"].aggregate.edge_rule == C.MultiKrumRule(name="multi-krum", f=1, m=2)


def test_switching_the_attack_kind_keeps_shared_fields_and_drops_the_others():
    base = {
        "attack": {
            "kind": "fqbd",
            "malicious": 0.1,
            "start_round": 3,
            "lam": 2.0,
            "solver": "cells",
            "epochs": 7,
            "pool": True,
        },
        "arms": {
            "none": {"attack.kind": "none"},
            "hong": {"attack.kind": "hong-backdoor", "attack.pool": False},
            "flip": {"attack.kind": "sign-flip", "attack.scale": 3.0},
            "bad": {"attack.kind": "hong-backdoor", "attack.solver": "ste"},
        },
    }
    cfg = from_dict(base)
    with pytest.raises(ConfigError) as e:
        cfg.arm_configs()
    assert e.value.field == "arms.bad.attack.solver"  # set by the arm itself: refused
    del base["arms"]["bad"]
    arms = from_dict(base).arm_configs()
    assert arms["none"].attack == C.NoAttack(kind="none")
    hong = arms["hong"].attack
    assert isinstance(hong, C.HongBackdoorAttack)
    assert (hong.malicious, hong.start_round, hong.lam, hong.epochs, hong.pool) == (
        0.1,
        3,
        2.0,
        7,
        False,
    )
    flip = arms["flip"].attack
    assert flip == C.ByzantineAttack(kind="sign-flip", malicious=0.1, start_round=3, scale=3.0)


def test_set_overrides_are_parsed_as_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train: {rounds: 3}\naggregate: {edge_rule: krum}\n")
    cfg = load_config(
        str(p),
        ["train.rounds=5", "quant.bits=[8, 4]", "train.device=cpu", "aggregate.edge_rule.f=2"],
    )
    assert cfg.train.rounds == 5 and cfg.quant.bits == [8, 4]
    assert cfg.aggregate.edge_rule == C.KrumRule(name="krum", f=2)


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


# --------------------------------------------------------------------------- old grammar


@pytest.mark.parametrize(
    "d, field, new",
    [
        (
            {"aggregate": {"edge_rule": "krum", "edge_options": {"f": 1}}},
            "aggregate.edge_options",
            "aggregate.edge_rule: {name: krum, f: 1}",
        ),
        (
            {"aggregate": {"cloud_rule": "dp-mean", "cloud_options": {"clip": 5.0}}},
            "aggregate.cloud_options",
            "aggregate.cloud_rule: {name: dp-mean, clip: 5.0}",
        ),
        (
            {"upload": [{"name": "fp32"}, {"quantize": {"levels": 16}}]},
            "upload[1]",
            "{name: quantize, levels: 16}",
        ),
        ({"upload": [{"fp32": {}}]}, "upload[0]", "{name: fp32}"),
        (
            {"defense": {"qcheck": True, "qcheck_ratio": 5.0, "global_clip": True, "rho0": 9.0}},
            "defense",
            "defenses: [{name: qcheck, ratio: 5.0}, {name: global-clip, rho0: 9.0}]",
        ),
        (
            {"defense": {"server_noise": 0.002, "dp_delta": 1e-6}},
            "defense",
            "defenses: [{name: server-noise, sigma: 0.002}]; defense.dp_delta is now 'delta'",
        ),
        (
            {"attack": {"kind": "fqbd", "trigger": {"size": 3}}},
            "attack.trigger",
            "trigger: {size: 3}",
        ),
        (
            {"arms": {"q": {"defense.qcheck": True}}},
            "arms.q.defense",
            "defenses: [{name: qcheck}]",
        ),
    ],
)
def test_old_grammar_is_refused_with_the_new_spelling(d, field, new):
    with pytest.raises(ConfigError) as e:
        from_dict(d).arm_configs()
    assert e.value.field == field
    assert new in str(e.value)


# --------------------------------------------------------------------------- schema


def test_json_schema_accepts_every_preset_file_and_refuses_mistakes():
    s = schema()
    jsonschema.Draft202012Validator.check_schema(s)
    validator = jsonschema.Draft202012Validator(s)
    for name in preset_names():
        validator.validate(load_preset_dict(name))
    for bad in (
        {"train": {"epoch": 3}},
        {"aggregate": {"edge_rule": {"name": "krum", "f": -1}}},
        {"upload": [{"quantize": {"levels": 16}}]},
        {"attack": {"kind": "fqbd", "scale": 2.0}},
        {"defenses": [{"name": "qcheck", "rho0": 1}]},
    ):
        assert not validator.is_valid(bad), bad
    validator.validate({"aggregate": {"edge_rule": "median"}, "upload": ["fp32"]})


def test_fedtier_schema_prints_the_schema_as_json(capsys):
    from fedtier.cli import main

    assert main(["schema"]) == 0
    assert json.loads(capsys.readouterr().out) == schema()


def test_cli_prints_a_config_error_on_one_line_and_exits_2(tmp_path, capsys):
    from fedtier.cli import main

    p = tmp_path / "c.yaml"
    p.write_text("aggregate: {edge_rule: krum, edge_options: {f: 1}}\n")
    assert main(["run", str(p), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "aggregate.edge_rule: {name: krum, f: 1}" in err


# ------------------------------------------------------------------- names kept in step


def test_names_in_the_config_layer_match_the_behaviour_registries():
    from fedtier.aggregate.robust import rule_names
    from fedtier.attacks import KINDS
    from fedtier.attacks.triggers import POSITIONS
    from fedtier.tasks import AutoencoderTask  # noqa: F401  (the task exists)
    from fedtier.topology import DEVICE_CLASSES
    from fedtier.upload import STAGES, codecs

    assert set(C.DEVICE_CLASS_NAMES) == set(DEVICE_CLASSES)
    assert set(C.variant_names(C.RuleConfig)) == set(rule_names())
    assert set(C.variant_names(C.StageConfig)) == set(STAGES)
    assert set(C.variant_names(C.AttackConfig)) == set(KINDS)
    assert C.UNIFORM_BUCKET == codecs.BUCKET
    assert set(get_literal(C.TriggerConfig, "position")) == set(POSITIONS)


def get_literal(cls: type[BaseModel], field: str) -> tuple:
    from typing import get_args

    return get_args(cls.model_fields[field].annotation)


def test_config_defaults_equal_the_factories_defaults():
    """A factory called with a variant's options() behaves as the factory's own defaults say."""
    from fedtier.aggregate.robust import FACTORIES
    from fedtier.upload import STAGES

    for union, registry in ((C.RuleConfig, FACTORIES), (C.StageConfig, STAGES)):
        for name, cls in C.variant_names(union).items():
            if name not in registry:
                continue
            params = inspect.signature(registry[name]).parameters
            model = cls.model_construct(name=name)
            for key in cls.model_fields:
                if key in ("name", "delta") or cls.model_fields[key].is_required():
                    continue
                assert key in params, (name, key)
                assert params[key].default == getattr(model, key), (name, key)


def test_the_config_layer_imports_no_behaviour():
    code = (
        "import sys, fedtier.config as c; c.from_dict({}); c.schema();"
        "print(sorted(m for m in sys.modules if m.startswith('fedtier')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.replace("'", '"')) == [
        "fedtier",
        "fedtier.config",
        "fedtier.errors",
    ]


def test_preset_files_are_in_the_new_grammar():
    for name in preset_names():
        text = resources.files("fedtier.presets").joinpath(f"{name}.yaml").read_text()
        for old in ("edge_options", "cloud_options", "defense.", "defense:"):
            assert old not in text, (name, old)
