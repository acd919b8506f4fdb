"""Benchmarks and the demo: side-by-side throughput (`throughput`), the report (`report`), the
results schema (`schema`), and the demo pipeline (`demo`). The CLI's `bench` and `demo` commands
are thin layers over these."""
