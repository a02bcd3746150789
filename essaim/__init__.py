"""The `essaim` command: wires the roles (coordinator, worker, data, demo) together."""
