"""Speed, cost and quality benchmarks for RxT, each writing JSON (and PNG plots)."""
