"""The ServerApp: fedtier's round plan, edge and cloud tiers (fedtier.interop.flower)."""

from fedtier.interop.flower import server_app

app = server_app()  # the experiment comes from the run config (fedtier-config, fedtier-set)
