"""The node-local DNS cache: unbound supervised by the agent, and its health check."""
