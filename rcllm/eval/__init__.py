"""Evaluation: protocol, systems and reports (the metrics they score with are in rcllm.data.metrics)."""
