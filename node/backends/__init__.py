"""Inference backends. Each loaded model is one backend object with its own worker."""
