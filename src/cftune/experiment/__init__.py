"""Stage 5, `cftune run CONFIG`: one YAML file → every stage, cached and resumable → the report.

`config` (the parsed experiment: `Experiment`), `plan` (the stages and their keys: `Runner`),
`data` (task and replay files), `evaluation` (the yardsticks as a `Measure`), `execute` (doing
the plan: `run(RunConfig(...))`), `results` (rows and comparisons for the report).
"""
