"""The gRPC transport: servicers that decode, call a protocol handler and encode; status map, auth, drain, health."""
