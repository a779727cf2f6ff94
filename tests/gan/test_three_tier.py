"""The three-tier GAN run: aggregation, async event order and damping, bytes per link,
determinism and resume, executors, bad input — each against values computed by hand or by
the codecs themselves."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from fedtier.config import Config, from_dict
from fedtier.errors import ConfigError, FedtierError
from fedtier.gan import GanState, prepare_three_tier, run_three_tier
from fedtier.topology import DEVICE_CLASSES
from fedtier.upload import codecs

SHAPE = (1, 8, 8)
NUMEL = 64
B = 4


def regions(sizes: tuple[int, ...] = (2, 2, 2), n: int = 10) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [[torch.rand(n, *SHAPE, generator=gen) * 2 - 1 for _ in range(j)] for j in sizes]


def config(**gan: Any) -> Config:
    extra = gan.pop("top", {})
    return from_dict(
        {
            "topology": {"edges": 3, "clients": 6},
            "eval": {"every": 1},
            "gan": {
                "generator": {"name": "dcgan-generator", "options": {"width": 4}},
                "discriminator": {"name": "dcgan-discriminator", "options": {"width": 4}},
                "z_dim": 8,
                "batch_size": B,
                "i_lo": 2,
                "i_gl": 2,
                **gan,
            },
            **extra,
        }
    )


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def test_sync_global_generator_is_the_softmax_weighted_mean_of_the_regions() -> None:
    cfg = config(temperature=0.05)
    result = run_three_tier(cfg, regions())
    state = result.state
    for record in result.history:
        want = softmax(-np.array(record["losses"]) / 0.05)
        np.testing.assert_allclose(record["weights"], want, rtol=1e-9)
    w = torch.tensor(result.history[-1]["weights"], dtype=torch.float32)
    torch.testing.assert_close(state.g, (w[:, None] * state.reported).sum(0))
    # every region restarts from G; the returned module holds G
    for flat in state.edges["generators"]:
        torch.testing.assert_close(flat, state.g)
    setup = prepare_three_tier(cfg, regions())
    assert result.generator is not None
    torch.testing.assert_close(setup.layout.flatten(result.generator), state.g)
    assert result.global_steps == 2 and result.generator_updates == 2 * 2 * 3


def test_pos_loss_flips_the_sign() -> None:
    result = run_three_tier(config(score="pos-loss", temperature=0.05, i_gl=1), regions())
    record = result.history[0]
    want = softmax(np.array(record["losses"]) / 0.05)
    np.testing.assert_allclose(record["weights"], want, rtol=1e-9)


def _phase_seconds(cfg: Config) -> list[float]:
    """Each region's local-phase duration from the wireless model written out by hand:
    per iteration the slowest device's C·3B/f + 8·bytes / (W log2(1 + g P))."""
    setup = prepare_three_tier(cfg, regions())
    prof, c = setup.topology.profiles, cfg.costs
    out = []
    for block in setup.blocks:
        slowest = 0.0
        for n in range(block.start, block.stop):
            kind = DEVICE_CLASSES[prof.kinds[prof.kind[n]]]
            t_cmp = kind.cycles_per_sample * 3 * B / (prof.f_max_ghz[n] * 1e9)
            rate = c.bandwidth_hz * np.log2(1 + setup.costs.gain[n] * kind.p_max_w)
            slowest = max(slowest, t_cmp + 8 * 4 * B * NUMEL / rate)
        out.append(cfg.gan.i_lo * slowest)
    return out


def test_sync_step_lasts_as_long_as_the_slowest_region() -> None:
    cfg = config()
    phase = _phase_seconds(cfg)
    result = run_three_tier(cfg, regions())
    times = [r["time_s"] for r in result.history]
    np.testing.assert_allclose(times, [max(phase), 2 * max(phase)], atol=1e-6)


def test_async_event_order_ages_and_damping_by_hand() -> None:
    cfg = config(update="async", alpha=0.7, temperature=0.1, top={"seed": 3})
    phase = _phase_seconds(cfg)
    assert len(set(np.round(phase, 9))) == 3, "the test needs regions of different speed"
    result = run_three_tier(cfg, regions())
    # the events by hand: region k reports at n·d_k; the first 2·K in (time, region) order
    events = sorted((n * d, k) for k, d in enumerate(phase) for n in range(1, 7))[:6]
    assert [r["region"] for r in result.history] == [k for _, k in events]
    np.testing.assert_allclose(
        [r["time_s"] for r in result.history], [t for t, _ in events], atol=1e-6
    )
    last: dict[int, int] = {}
    for step, record in enumerate(result.history, start=1):
        last[record["region"]] = step
        ages = [step - last[k] if k in last else 0 for k in range(3)]
        assert record["ages"] == ages
        live = np.array([k in last for k in range(3)])
        logits = -np.array([x if x is not None else 0.0 for x in record["losses"]]) / 0.1
        damp = (1.0 + np.array(ages)) ** -0.7
        want = np.where(live, np.exp(logits - logits[live].max()) * damp, 0.0)
        np.testing.assert_allclose(record["weights"], want / want.sum(), rtol=1e-9)
    assert result.time_s == pytest.approx(events[-1][0])


def test_async_stops_at_the_time_budget() -> None:
    cfg = config(update="async", i_gl=50, top={"seed": 3})
    budget = 2.5 * max(_phase_seconds(cfg))
    cfg = config(update="async", i_gl=50, top={"seed": 3, "schedule": {"time_budget_s": budget}})
    result = run_three_tier(cfg, regions())
    times = [r["time_s"] for r in result.history]
    assert times and max(times) <= budget and result.time_s <= budget
    assert result.global_steps == len(times) < 150


def test_fp32_bytes_are_four_per_float_on_every_link() -> None:
    cfg = config()
    result = run_three_tier(cfg, regions())
    setup = prepare_three_tier(cfg, regions())
    p_g = setup.layout.size
    iterations = 2 * 2  # i_gl × i_lo, every region and device
    assert result.bytes == {
        "edge_device_samples": iterations * 6 * 2 * B * NUMEL * 4,
        "device_edge_feedback": iterations * 6 * B * NUMEL * 4,
        "edge_cloud_generator": 2 * 3 * 4 * p_g,
        "cloud_edge_generator": 2 * 3 * 4 * p_g,
    }


def test_codec_bytes_are_the_encoded_sizes() -> None:
    cfg = config(top={"upload": [{"name": "quantize", "levels": 16, "bucket": 64}]})
    result = run_three_tier(cfg, regions())
    p_g = prepare_three_tier(cfg, regions()).layout.size

    def encoded(d: int) -> int:
        x = torch.randn(d)
        return len(codecs.encode_uniform(x, 16, torch.Generator().manual_seed(0), 64))

    assert result.bytes["device_edge_feedback"] == 2 * 2 * 6 * encoded(B * NUMEL)
    assert result.bytes["edge_cloud_generator"] == 2 * 3 * encoded(p_g)
    assert result.bytes["device_edge_feedback"] < 2 * 2 * 6 * B * NUMEL * 4 / 6  # ~4-bit codes
    assert result.bytes["cloud_edge_generator"] == 2 * 3 * 4 * p_g  # the download stays fp32


def _final(result: Any) -> torch.Tensor:
    return result.state.g


@pytest.mark.parametrize("update", ["sync", "async"])
def test_same_seed_same_numbers_and_resume(update: str) -> None:
    cfg = config(update=update)
    saved: list[dict[str, Any]] = []
    first = run_three_tier(cfg, regions(), on_checkpoint=lambda s: saved.append(s.to_dict()))
    again = run_three_tier(cfg, regions())
    assert torch.equal(_final(first), _final(again)) and first.history == again.history
    other = run_three_tier(config(update=update, top={"seed": 1}), regions())
    assert not torch.equal(_final(first), _final(other))
    # resume from the checkpoint after the first evaluation: the same run
    resumed = run_three_tier(cfg, regions(), state=GanState.from_dict(saved[0]))
    assert torch.equal(_final(first), _final(resumed)) and resumed.history == first.history


def test_executors_agree_through_a_run() -> None:
    vec = run_three_tier(config(executor="vectorised"), regions())
    seq = run_three_tier(config(executor="sequential"), regions())
    # float rounding differs (vmap's batched convolutions); Adam turns a near-zero gradient's
    # rounding into up to one step of lr, so a few coordinates may differ by O(lr)
    diff = (vec.state.g - seq.state.g).abs()
    assert float((diff > 1e-5).float().mean()) < 0.01 and float(diff.max()) < 4 * 2e-4
    for a, b in zip(vec.history, seq.history):
        np.testing.assert_allclose(a["losses"], b["losses"], rtol=1e-4)


def test_train_precision_reaches_the_device_discriminators() -> None:
    cfg = config(top={"train": {"precision": "bf16"}})
    assert prepare_three_tier(cfg, regions()).discriminators.precision == "bf16"
    assert prepare_three_tier(config(), regions()).discriminators.precision == "fp32"


def test_mixture_samples_each_region_by_its_weight() -> None:
    result = run_three_tier(config(aggregate="mixture", i_gl=1), regions())
    assert result.generator is None and result.bytes["cloud_edge_generator"] == 0
    images = result.sample(50, 0)
    assert images.shape == (50, *SHAPE) and images.abs().max() <= 1
    assert torch.equal(images, result.sample(50, 0))


def test_on_eval_receives_records_and_a_sampler() -> None:
    seen: list[tuple[int, tuple[int, ...]]] = []
    run_three_tier(
        config(),
        regions(),
        on_eval=lambda rec, sample: seen.append((rec["round"], tuple(sample(3, 0).shape))),
    )
    assert seen == [(1, (3, *SHAPE)), (2, (3, *SHAPE))]


@pytest.mark.parametrize(
    ("gan", "field"),
    [
        ({"i_lo": 0}, "gan.i_lo"),
        ({"i_gl": -1}, "gan.i_gl"),
        ({"temperature": 0}, "gan.temperature"),
    ],
)
def test_bad_gan_settings_name_the_field(gan: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        config(**gan)


@pytest.mark.parametrize(
    ("top", "field", "names"),
    [
        ({"aggregate": {"edge_rule": "krum"}}, "aggregate.edge_rule", "krum"),
        ({"aggregate": {"cloud_rule": "median"}}, "aggregate.cloud_rule", "median"),
        ({"attack": {"kind": "sign-flip"}}, "attack.kind", "sign-flip"),
        ({"upload": [{"name": "ldp"}]}, r"upload\[0\].name", "ldp"),
        ({"defenses": ["qcheck"]}, r"defenses\[0\].name", "qcheck"),
        ({"schedule": {"name": "fedasync"}}, "schedule.name", "gan.update"),
        ({"quant": {"qat": True}}, "quant.qat", "three-tier"),
    ],
)
def test_rules_attacks_and_stages_that_cannot_apply(top: dict, field: str, names: str) -> None:
    with pytest.raises(ConfigError, match=field) as info:
        run_three_tier(config(top=top), regions())
    assert names in str(info.value) and "three-tier GAN" in str(info.value)


def test_bad_regions() -> None:
    with pytest.raises(ConfigError, match=r"regions\[1\].*at least one device"):
        run_three_tier(config(), regions((2, 0, 4)))
    with pytest.raises(ConfigError, match="topology.edges"):
        run_three_tier(config(), regions((3, 3)))
    with pytest.raises(ConfigError, match="topology.clients"):
        run_three_tier(config(), regions((2, 2, 3)))
    with pytest.raises(FedtierError, match=r"\[-1, 1\]"):
        run_three_tier(config(), [[x * 3 for x in r] for r in regions()])


def test_feedback_past_the_deadline_is_dropped() -> None:
    top = {"costs": {"deadline_s": 1e-6, "stragglers": "drop"}}
    cfg = config(top=top)
    result = run_three_tier(cfg, regions())
    setup = prepare_three_tier(cfg, regions())
    # no device makes a microsecond: no G_k takes a step (only BatchNorm's running statistics
    # move, in the train-mode forward passes), every iteration lasts T_max
    assert result.generator_updates == 0
    final = setup.layout.views(result.state.g)
    for name, value in setup.layout.views(setup.layout.flatten(setup.generators[0])).items():
        if "running" not in name:
            torch.testing.assert_close(final[name], value)
    assert result.time_s == pytest.approx(2 * 2 * 1e-6)
    assert result.costs["dropped"] == 2 * 2 * 6


def test_sync_stops_after_the_step_that_reaches_the_budget_evaluating_once() -> None:
    budget = 1.5 * max(_phase_seconds(config()))
    cfg = config(i_gl=5, top={"schedule": {"time_budget_s": budget}})
    rounds: list[int] = []
    result = run_three_tier(cfg, regions(), on_eval=lambda rec, sample: rounds.append(rec["round"]))
    assert result.global_steps == 2 and rounds == [1, 2]
    assert result.time_s >= budget
