"""The bench and the demo: the paper's table measured side by side (`paper_table`), the demo
pipeline (`demo_pipeline`), freezing-phase training steps (`workloads`), the results schema
(`schema`) and the report drawn from it (`report`). The CLI's `bench` and `demo` commands are
thin layers over these; the timing itself is `lrdaccel.measure`'s."""
