"""Generated gRPC/protobuf modules for the plugin wire protocol."""
