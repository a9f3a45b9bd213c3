"""sabiscale_analysis: reads what sabiscale runs leave behind (probe losses, MLflow runs) and runs
the experiments. Installed under this name from the repository's analysis/ folder; it depends on
sabiscale's public API, never the other way round (`sabiscale analyze` reaches it through the
`sabiscale.commands` entry point).

Public API: trajectories.load_trajectories, classify, fractions, write_report, log_to_runs;
the experiments run as `python -m sabiscale_analysis.exp_masked_descramble` and
`python -m sabiscale_analysis.exp_rho1_noise`.
"""
