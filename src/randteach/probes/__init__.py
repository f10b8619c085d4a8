"""Probes: how much label information a frozen encoder carries. `linear_knn` (the linear and k-NN
probes), `embedding` (embedding a data set, `Prober`), `run` (probing a finished run folder)."""
