import pytest
import torch

from fedtier.aggregate import ServerStep, client_weights, weighted_mean


def test_weighted_mean_by_hand_and_permutation_invariant():
    u = torch.tensor([[1.0, 0.0], [3.0, 4.0]])
    w = torch.tensor([1.0, 3.0])
    mean, _, _ = weighted_mean(u, w)
    torch.testing.assert_close(mean, torch.tensor([2.5, 3.0]))
    torch.testing.assert_close(weighted_mean(u.flip(0), w.flip(0))[0], mean)


def test_weighted_mean_rejects_bad_shapes():
    with pytest.raises(ValueError):
        weighted_mean(torch.zeros(3, 2), torch.ones(2))


def test_qafed_server_step_is_eta_sum_over_population():
    deltas = torch.randn(4, 5)
    step = ServerStep("qafed", server_lr=6.0, population=100)
    mean, _, _ = weighted_mean(deltas, client_weights("qafed", torch.tensor([10, 20, 30, 40])))
    w = torch.zeros(5)
    torch.testing.assert_close(step.apply(w, mean, sampled=4), 6.0 * deltas.sum(0) / 100)


def test_qafed_with_eta_n_over_m_is_plain_average():
    deltas = torch.randn(10, 3)
    step = ServerStep("qafed", server_lr=100 / 10, population=100)
    mean, _, _ = weighted_mean(deltas, torch.ones(10))
    torch.testing.assert_close(step.apply(torch.zeros(3), mean, 10), deltas.mean(0))


def test_fedavg_weights_by_samples():
    assert client_weights("fedavg", torch.tensor([1, 3])).tolist() == [1.0, 3.0]
    assert client_weights("qafed", torch.tensor([1, 3])).tolist() == [1.0, 1.0]


def test_weighted_mean_reports_its_rows_and_refuses_clearly():
    _, m, kept = weighted_mean(torch.ones(3, 5), torch.ones(3))
    assert m == {"rows": 3.0} and kept is None
    with pytest.raises(
        ValueError,
        match=r"^expected updates \[C, P\] and weights \[C\], got \(3, 5\) and \(2,\)$",
    ):
        weighted_mean(torch.ones(3, 5), torch.ones(2))
    with pytest.raises(ValueError, match="^weights must have a positive sum$"):
        weighted_mean(torch.ones(2, 2), torch.zeros(2))


def test_get_rule_gives_the_weighted_mean_and_names_the_known_rules():
    from fedtier.aggregate import get_rule
    from fedtier.errors import UnknownNameError

    u = torch.tensor([[1.0, 2.0], [3.0, -2.0], [0.0, 4.0]])
    w = torch.tensor([1.0, 3.0, 4.0])
    out, m, kept = get_rule("mean")(u, w)
    torch.testing.assert_close(out, torch.tensor([(1 + 9 + 0) / 8, (2 - 6 + 16) / 8]))
    assert m == {"rows": 3.0} and kept is None
    with pytest.raises(UnknownNameError) as e:
        get_rule("maen")
    assert (
        str(e.value)
        == "unknown aggregation rule 'maen'. Known aggregation rules: mean. Did you mean 'mean'?"
    )
