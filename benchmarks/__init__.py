"""Benchmarks of ppl against the reference (`torch.distributions.Categorical`) and against floors.

Not part of the test run. `python -m benchmarks` runs everything and writes the results under
`benchmarks/results/`; `python -m benchmarks --help` lists the options.
"""
