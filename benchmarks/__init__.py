"""Speed and memory benchmarks of libnet-plugin (docs/design.md section 6); run ``python -m benchmarks.run``."""
