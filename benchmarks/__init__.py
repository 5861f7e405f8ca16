"""Side-by-side measurements, run as `python -m benchmarks.<name>`; each prints a markdown table and writes JSON."""
