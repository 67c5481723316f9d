"""Retraining pipeline (issue 4). May import registry and monitors."""
