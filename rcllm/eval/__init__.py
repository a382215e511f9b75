"""Evaluation: protocol, metrics, systems and reports."""
