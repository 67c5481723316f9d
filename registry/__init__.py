"""Model registry (issue 4). Imports nothing else of Servo's."""
