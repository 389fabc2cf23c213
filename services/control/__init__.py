"""The control and event plane: wire protocol, endpoints, keys, client."""
