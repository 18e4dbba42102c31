"""Generated gRPC modules for protos/visearch/v1 (do not edit; `make proto`)."""
