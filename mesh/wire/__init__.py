"""The wire contract: generated protobuf/gRPC code (`v1/`), conversions to the domain
(`codec`) and the gRPC channel/server options every endpoint uses (`grpc_options`)."""
