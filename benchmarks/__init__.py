"""imglock's benchmarks: each figure a median beside a floor or a peer measured in the same run."""
