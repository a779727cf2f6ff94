"""The ClientApp: fedtier's task, local training and upload chain on one device; the node's
partition-id is its fedtier client id."""

from fedtier.interop.flower import client_app

app = client_app()  # the experiment comes from the run config (fedtier-config, fedtier-set)
