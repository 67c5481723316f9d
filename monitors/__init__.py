"""Drift and accuracy monitors (issue 5). Imports nothing else of Servo's."""
