"""The wire contract: generated protobuf message code (`v1/`; the gRPC service stubs are
generated next to their users, `node/transport/` and `cloud_relay/`, so nothing here
imports grpc), conversions to the domain (`codec`) and the values of the gRPC
channel/server options every endpoint uses (`grpc_options`)."""
