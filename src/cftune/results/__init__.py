"""Stage 4, `cftune report`: what the evaluations mean, as tables and plots.

`metrics` (names and the row schema), `compare` (paired comparisons between runs, over seeds),
`frontier` (methods' trade-off curves compared at matched task gain; `frontier_plot` draws
them), `tables`, `plots`, `ablation` (a setting's sweep), `report` (render an experiment
folder). Statistics themselves are `cftune.stats`.
"""
