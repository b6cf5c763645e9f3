"""The Allerac relay server (DESIGN.md "Relay"); built in the issue "Across the internet"."""
