"""Generated from protos/epoxi/v1; do not edit."""
