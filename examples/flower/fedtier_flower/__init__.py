"""A fedtier experiment as a Flower app (see ../simulate.py and ../pyproject.toml)."""
