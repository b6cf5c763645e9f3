"""The Allerac agent daemon: gRPC servicer, OpenAI-compatible HTTP API, inference backends, CLI."""
