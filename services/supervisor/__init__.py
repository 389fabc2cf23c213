"""`edgeroom run`: the services as child processes, with systemd's semantics."""
