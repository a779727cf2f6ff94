"""Aggregation: pure rules over stacked updates, used at the edge and at the cloud."""

from fedtier.aggregate.rules import RULES, get_rule, weighted_mean
from fedtier.aggregate.server import ServerStep, client_weights

__all__ = ["RULES", "ServerStep", "client_weights", "get_rule", "weighted_mean"]
