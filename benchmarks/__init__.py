"""Speed and memory benchmarks of libnet-plugin (DESIGN.md section 6); run ``python -m benchmarks.run``."""
