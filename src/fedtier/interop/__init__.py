"""fedtier with other federated-learning frameworks: :mod:`fedtier.interop.flower` (the
``flower`` extra) runs an experiment's device tier as a Flower ``ClientApp`` and its edge and
cloud tiers as a Flower ``Strategy``."""
