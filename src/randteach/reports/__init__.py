"""Reports: `run` (one run's tables and figures, and the names every report shares), `groups`
(many runs grouped by their swept keys), `experiment` (an experiment's tables against the papers)."""
