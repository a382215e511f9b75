"""Serving: nodes (engine over a tiered block store), the coordinator (routing, failover,
replication), the request/response schema they share, and a client."""
