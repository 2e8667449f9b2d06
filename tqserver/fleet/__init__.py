"""server.proxy_processes: the supervisor's side of N proxy processes, the proxy process
itself, and the AMP protocol between them."""
